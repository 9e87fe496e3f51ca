//go:build linux
// +build linux

// Package conformance runs containerd's snapshotter conformance suite
// (snapshots/testsuite.SnapshotterSuite) against `liftoff snapshotter`, through
// containerd's own proxy client over a unix-socket gRPC connection, and against
// containerd's overlayfs snapshotter as the control. Every suite test gets a
// fresh liftoff process with its own root and socket.
//
// Each runs twice: called directly (as CRI's calls arrive, with the namespace
// header) and under containerd's metadata layer (metadata.DB), which is what a
// containerd daemon puts in front of every snapshotter: it renames keys to
// `<ns>/<seq>/<key>` and keeps its own records. There the namespace header is
// stripped, as Debian's containerd sends it only on CRI calls.
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
	"github.com/containerd/containerd/metadata"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/testutil"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/overlay"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	bolt "go.etcd.io/bbolt"
	"google.golang.org/grpc"
	grpcmetadata "google.golang.org/grpc/metadata"
)

var (
	liftoffBin = flag.String("liftoff", "liftoff", "the liftoff executable to test")
	logDir     = flag.String("logdir", "", "keep each liftoff process's log in this directory")
)

const (
	startTimeout = 60 * time.Second // the socket must appear within this (a loaded CI machine is slow)
	stopTimeout  = 20 * time.Second // SIGTERM, then SIGKILL after this
)

func newOverlay(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	sn, err := overlay.NewSnapshotter(root)
	if err != nil {
		return nil, nil, err
	}
	return sn, sn.Close, nil
}

// TestOverlay is the control: containerd's own overlayfs snapshotter.
func TestOverlay(t *testing.T) {
	testutil.RequiresRoot(t)
	testsuite.SnapshotterSuite(t, "overlayfs", newOverlay)
}

// TestLiftoff runs the suite against a fresh `liftoff snapshotter` per test.
func TestLiftoff(t *testing.T) {
	testutil.RequiresRoot(t)
	testsuite.SnapshotterSuite(t, "liftoff", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return startLiftoff(ctx, root, false)
	})
}

// TestOverlayMetadata is the control under containerd's metadata layer.
func TestOverlayMetadata(t *testing.T) {
	testutil.RequiresRoot(t)
	testsuite.SnapshotterSuite(t, "overlayfs-md", underMetadata("overlayfs", newOverlay))
}

// TestLiftoffMetadata runs liftoff under containerd's metadata layer, without the namespace header.
func TestLiftoffMetadata(t *testing.T) {
	testutil.RequiresRoot(t)
	testsuite.SnapshotterSuite(t, "liftoff-md", underMetadata("liftoff", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return startLiftoff(ctx, root, true)
	}))
}

// underMetadata puts containerd's metadata layer (a bolt database of its own) in front of a backend.
func underMetadata(name string, backend testsuite.SnapshotterFunc) testsuite.SnapshotterFunc {
	return func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		backendRoot := filepath.Join(root, "backend")
		if err := os.Mkdir(backendRoot, 0o700); err != nil {
			return nil, nil, err
		}
		sn, stop, err := backend(ctx, backendRoot)
		if err != nil {
			return nil, nil, err
		}
		db, err := bolt.Open(filepath.Join(root, "metadata.db"), 0o600, nil)
		if err != nil {
			_ = stop()
			return nil, nil, err
		}
		msn := metadata.NewDB(db, nil, map[string]snapshots.Snapshotter{name: sn}).Snapshotter(name)
		return msn, func() error {
			closeErr := msn.Close()
			dbErr := db.Close()
			if err := stop(); err != nil {
				return err
			}
			if closeErr != nil {
				return closeErr
			}
			return dbErr
		}, nil
	}
}

// withoutNamespaceHeader drops the containerd-namespace header from outgoing calls.
func withoutNamespaceHeader(ctx context.Context) context.Context {
	md, ok := grpcmetadata.FromOutgoingContext(ctx)
	if !ok {
		return ctx
	}
	md = md.Copy()
	delete(md, namespaces.GRPCHeader)
	return grpcmetadata.NewOutgoingContext(ctx, md)
}

// startLiftoff starts `liftoff snapshotter` with its state and socket under root,
// waits for the socket and returns containerd's proxy snapshotter over it
// (sending no namespace header when noHeader is set).
func startLiftoff(ctx context.Context, root string, noHeader bool) (snapshots.Snapshotter, func() error, error) {
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
	options := []grpc.DialOption{grpc.WithInsecure(), grpc.WithBlock(), grpc.WithContextDialer(dialer)}
	if noHeader {
		options = append(options,
			grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply interface{}, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
				return invoker(withoutNamespaceHeader(ctx), method, req, reply, cc, opts...)
			}),
			grpc.WithStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
				return streamer(withoutNamespaceHeader(ctx), desc, cc, method, opts...)
			}))
	}
	conn, err := grpc.DialContext(dialCtx, socket, options...)
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
	dir := root
	for filepath.Dir(dir) != dir && !strings.HasPrefix(filepath.Base(dir), "snapshot-suite-") {
		dir = filepath.Dir(dir)
	}
	name := filepath.Base(dir) + ".log"
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
