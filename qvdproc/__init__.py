"""What the host's live processes say: the mount table and the processes in /proc, and a
qvdfs daemon's counters over its socket.

qvdfs (the daemon finds its own mount for the read-ahead window), qvdctl (a VM's root is
mounted, a container's monitor still runs), the tests and the benchmarks all ask these
questions. qvdfs and qvdctl never import each other, so the one reader of each lives here,
below both, and imports nothing of the project.

- ``mountinfo``: ``/proc/self/mountinfo`` parsed, paths unescaped.
- ``processes``: the process table (argv, state, status fields, CPU time, credentials).
- ``counters``: a running qvdfs daemon's per-opcode counters (``qvdfs stats``, metrics).
- ``devices``: whether a configured device path (/dev/fuse, a watchdog) is a character device.
"""
