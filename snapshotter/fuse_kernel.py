"""The Linux FUSE protocol (include/uapi/linux/fuse.h), as much of it as a read-only filesystem needs.

liftoff speaks the protocol to /dev/fuse itself instead of through libfuse: that is what
lets it ask for what moves start time and no Python binding exposes all of (the kernel's
no-open and no-opendir modes, cached symlinks and directory listings, readdirplus, 1 MiB
reads), and it keeps a mount's connection in one file descriptor that can outlive the daemon.
"""

from __future__ import annotations

import struct

KERNEL_MAJOR = 7
KERNEL_MINOR = 31  # what we speak; the kernel answers with its own minor, we use the lower

# opcodes
LOOKUP, FORGET, GETATTR, SETATTR, READLINK = 1, 2, 3, 4, 5
OPEN, READ, WRITE, STATFS, RELEASE = 14, 15, 16, 17, 18
GETXATTR, LISTXATTR, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR = 22, 23, 25, 26, 27, 28, 29
ACCESS, INTERRUPT, DESTROY, IOCTL, BATCH_FORGET, READDIRPLUS, STATX = 34, 36, 38, 39, 42, 44, 52

# INIT flags
ASYNC_READ = 1 << 0
ASYNC_DIO = 1 << 15  # direct I/O of an asynchronous caller (EROFS reading its blob) is not waited for
PARALLEL_DIROPS = 1 << 18
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
NO_OPEN_SUPPORT = 1 << 17
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
INIT_EXT = 1 << 30  # the kernel's INIT carries flags2 (the upper 32 flag bits)
HAS_RESEND = 1 << (39 - 32)  # in flags2: the kernel takes NOTIFY_RESEND (7.40, Linux 6.9)
PASSTHROUGH = 1 << (37 - 32)  # in flags2: reads of an open file served from a backing file (7.40, Linux 6.9)
MAX_STACK_DEPTH = 1  # INIT reply with PASSTHROUGH: backing files on a plain filesystem, overlayfs may stack on us

# notifications: an unsolicited write of OUT_HEADER with unique 0 and error = the code
NOTIFY_INVAL_INODE = 2  # drop an inode's cached pages (and attributes)
NOTIFY_STORE = 4  # put bytes in an inode's page cache (the kernel must hold the inode)
NOTIFY_RESEND = 7  # put every request read but not answered back on the queue
UNIQUE_RESEND = 1 << 63  # set in the unique of a request the kernel queued again

# open reply flags
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FOPEN_PASSTHROUGH = 1 << 7  # with OPEN_OUT's backing_id; no other flag but DIRECT_IO/NOFLUSH may go with it

# ioctls on the /dev/fuse descriptor (_IOW(229, nr, size)); CAP_SYS_ADMIN, on a connection that
# negotiated PASSTHROUGH
DEV_IOC_BACKING_OPEN = (1 << 30) | (16 << 16) | (229 << 8) | 1  # BACKING_MAP in, the backing id returned
DEV_IOC_BACKING_CLOSE = (1 << 30) | (4 << 16) | (229 << 8) | 2  # the backing id (uint32) in
BACKING_MAP = struct.Struct("<iIQ")  # fd flags padding

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags (flags2 and more follow on new kernels)
INIT_IN_FLAGS2 = struct.Struct("<I")  # at INIT_IN.size, when flags has INIT_EXT
INIT_OUT = struct.Struct(
    "<IIIIHHIIHHII"
)  # ... max_background, congestion_threshold, max_write, time_gran, max_pages, map_alignment, flags2, max_stack_depth
INIT_OUT_SIZE = 64
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks atime mtime ctime *nsec mode nlink uid gid rdev blksize flags
ENTRY_PREFIX = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec
ATTR_OUT_PREFIX = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
OPEN_IN = struct.Struct("<II")  # flags open_flags
RELEASE_IN = struct.Struct("<QIII")  # fh flags release_flags lock_owner(low half)
READ_IN = struct.Struct("<QQII")  # fh offset size read_flags (lock_owner, flags follow)
GETXATTR_IN = struct.Struct("<II")  # size padding
GETXATTR_OUT = struct.Struct("<II")  # size padding
DIRENT = struct.Struct("<QQII")  # ino off namelen type
KSTATFS = struct.Struct("<QQQQQIII")  # blocks bfree bavail files ffree bsize namelen frsize (+ padding, spare[6])
KSTATFS_SIZE = 80
UNIQUE = struct.Struct("<Q")
NOTIFY_STORE_OUT = struct.Struct("<QQII")  # nodeid offset size padding
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino offset length (0, 0: all of it)
