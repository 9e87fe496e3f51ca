//go:build linux
// +build linux

// Package conformance runs containerd's snapshotter conformance suite
// (snapshots/testsuite.SnapshotterSuite) against `liftoff snapshotter`, through
// containerd's own proxy client over a unix-socket gRPC connection, and against
// containerd's overlayfs snapshotter as the control. Every suite test gets a
// fresh liftoff process with its own root and socket.
//
// Build (GOPATH mode, Debian's containerd source): see scripts/conformance.
// Run as root: conformance.test -test.root -test.v -liftoff /path/to/liftoff
package conformance

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/pkg/testutil"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/overlay"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

var (
	liftoffBin = flag.String("liftoff", "liftoff", "the liftoff executable to test")
	logDir     = flag.String("logdir", "", "keep each liftoff process's log in this directory")
)

const (
	startTimeout = 60 * time.Second // the socket must appear within this (a loaded CI machine is slow)
	stopTimeout  = 20 * time.Second // SIGTERM, then SIGKILL after this
)

// TestOverlay is the control: containerd's own overlayfs snapshotter.
func TestOverlay(t *testing.T) {
	testutil.RequiresRoot(t)
	testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sn, err := overlay.NewSnapshotter(root)
		if err != nil {
			return nil, nil, err
		}
		return sn, sn.Close, nil
	})
}

// TestLiftoff runs the suite against a fresh `liftoff snapshotter` per test.
func TestLiftoff(t *testing.T) {
	testutil.RequiresRoot(t)
	testsuite.SnapshotterSuite(t, "liftoff", startLiftoff)
}

// startLiftoff starts `liftoff snapshotter` with its state and socket under root,
// waits for the socket and returns containerd's proxy snapshotter over it.
func startLiftoff(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	state := filepath.Join(root, "state")
	socket := filepath.Join(root, "run", "snapshotter.sock")
	logPath := filepath.Join(root, "liftoff.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(*liftoffBin, "snapshotter", "--root", state, "--socket", socket, "--log-level", "debug")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, nil, fmt.Errorf("cannot start %s: %w", *liftoffBin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	// stop ends the process (SIGTERM, then SIGKILL) and says how it ended if that was not a clean stop.
	stop := func() error {
		var waitErr error
		select {
		case waitErr = <-exited:
			waitErr = fmt.Errorf("liftoff snapshotter exited before it was stopped: %v", waitErr)
		default:
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case waitErr = <-exited:
			case <-time.After(stopTimeout):
				_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				<-exited
				waitErr = fmt.Errorf("liftoff snapshotter did not stop within %s of SIGTERM", stopTimeout)
			}
		}
		logFile.Close()
		keepLog(root, logPath)
		return waitErr
	}
	failed := func(err error) (snapshots.Snapshotter, func() error, error) {
		_ = stop()
		return nil, nil, fmt.Errorf("%v; its log ends:\n%s", err, tail(logPath))
	}

	if err := waitForSocket(socket, exited); err != nil {
		return failed(err)
	}
	dialer := func(ctx context.Context, addr string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", addr)
	}
	dialCtx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	conn, err := grpc.DialContext(dialCtx, socket, grpc.WithInsecure(), grpc.WithBlock(), grpc.WithContextDialer(dialer))
	if err != nil {
		return failed(fmt.Errorf("cannot connect to %s: %v", socket, err))
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "liftoff")
	cleanup := func() error {
		connErr := conn.Close()
		if err := stop(); err != nil {
			return fmt.Errorf("%v; its log ends:\n%s", err, tail(logPath))
		}
		return connErr
	}
	return sn, cleanup, nil
}

// waitForSocket polls until the socket exists or the process exits.
func waitForSocket(socket string, exited chan error) error {
	deadline := time.Now().Add(startTimeout)
	for time.Now().Before(deadline) {
		if st, err := os.Stat(socket); err == nil && st.Mode()&os.ModeSocket != 0 {
			return nil
		}
		select {
		case err := <-exited:
			exited <- err // stop() reads it again
			return fmt.Errorf("liftoff snapshotter exited before serving %s: %v", socket, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	return fmt.Errorf("liftoff snapshotter did not create %s within %s", socket, startTimeout)
}

// keepLog copies a process's log into -logdir, named after the suite test's temporary directory.
func keepLog(root, logPath string) {
	if *logDir == "" {
		return
	}
	name := filepath.Base(filepath.Dir(root)) + ".log"
	src, err := os.Open(logPath)
	if err != nil {
		return
	}
	defer src.Close()
	dst, err := os.Create(filepath.Join(*logDir, name))
	if err != nil {
		return
	}
	defer dst.Close()
	_, _ = io.Copy(dst, src)
}

// tail is the end of a log file, for error messages.
func tail(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > 20 {
		lines = lines[len(lines)-20:]
	}
	return strings.Join(lines, "\n")
}
