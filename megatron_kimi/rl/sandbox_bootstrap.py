"""Code that runs inside a code-reward sandbox (see :mod:`megatron_kimi.rl.sandbox`).

``BOOTSTRAP`` finishes the set-up inside the wrapper's namespaces (as root when the trainer is root),
forks, and in the child joins the run's cgroups, sets the rlimits, drops privileges and execs the
interpreter on ``PRELUDE``; the parent half reports the program's wait status through a pipe.

``PRELUDE`` (``python -I -S -c PRELUDE AUDIT_FD WORKDIR``) installs an audit hook and then runs
``main.py`` as ``__main__``.  The hook only *counts* what the kernel-side isolation refuses or
contains, one line ``kind\tdetail`` per event on ``AUDIT_FD`` (at most 50 per kind):

* ``network``: ``socket.connect``/``sendto``/``sendmsg``/``getaddrinfo`` (any address; with a
  network namespace nothing is reachable);
* ``fs``: opening for writing, creating, removing, renaming, linking, ``chmod``/``chown``/``truncate``
  of a path outside the work directory (``/dev/null`` and friends excepted);
* ``pids``: an ``os.fork`` refused with ``EAGAIN`` (the process limit).

It sees the program's Python process and its forks, not other executables they start, and a
program can close the fd: the counts are accounting, the containment is the kernel's.
"""

BOOTSTRAP = r"""
import json, os, re, sys
cfg = json.loads(sys.argv[1])
sfd = cfg["status_fd"]
def report(**kw):
    try:
        os.write(sfd, (json.dumps(kw) + "\n").encode())
    except OSError:
        pass
W, uid, gid = cfg["workdir"], cfg["uid"], cfg["gid"]
try:
    if cfg["remount"]:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        def mount(src, tgt, fstype, flags, data):
            enc = lambda s: None if s is None else os.fsencode(s)
            if libc.mount(enc(src), enc(tgt), enc(fstype), flags, enc(data)) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e), tgt)
        keep = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
        points = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
                points.append((mp, parts[5].split(",")))
        n_ro = 0
        for mp, opts in points:
            if mp == "/proc" or mp.startswith("/proc/") or mp in ("/dev", "/dev/pts"):
                continue
            flags = 4096 | 32 | 1  # MS_BIND | MS_REMOUNT | MS_RDONLY
            for o in opts:
                flags |= keep.get(o, 0)
            try:
                mount(None, mp, None, flags, None)
                n_ro += 1
            except OSError:
                if mp == "/":
                    raise
        owner = "" if uid is None else ",uid=%d,gid=%d" % (uid, gid)
        mount("tmpfs", W, "tmpfs", 2 | 4, "size=%d,mode=0700%s" % (cfg["disk_bytes"], owner))
        report(remounted_ro=n_ro)
    elif cfg["chown_workdir"] and uid is not None:
        os.chown(W, uid, gid)
        os.chmod(W, 0o700)
    with open(cfg["code_path"], "rb") as f:
        code = f.read()
    os.set_inheritable(sfd, False)
except BaseException as e:
    report(error="bootstrap: %r" % (e,))
    os._exit(125)
if cfg["reap"]:
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception:
        pass
pid = os.fork()
if pid == 0:
    try:
        for fd in cfg["cgroup_fds"]:  # join the run's cgroup(s) first: all the program starts is inside
            os.write(fd, b"0")
            os.close(fd)
        os.setpgid(0, 0)
        fd = os.open(cfg["stdin_path"], os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)
        import resource
        for name, soft, hard in cfg["rlimits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        try:
            import ctypes
            if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS
                report(no_new_privs=True)
        except Exception:
            pass
        os.chdir(W)
        with open("main.py", "wb") as f:
            f.write(code)
        os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-c", cfg["prelude"], str(cfg["audit_fd"]), W],
                  cfg["env"])
    except BaseException as e:
        report(error="child setup: %r" % (e,))
        os._exit(126)
for fd in cfg["cgroup_fds"] + [cfg["audit_fd"]]:
    os.close(fd)
report(child_pid=pid)
while True:
    try:
        _, status, ru = os.wait4(pid, 0)
        break
    except InterruptedError:
        continue
report(status=status, cpu=ru.ru_utime + ru.ru_stime, maxrss_kb=ru.ru_maxrss)
if cfg["reap"]:  # no PID namespace: kill and reap whatever the program left behind
    import time
    if uid is not None:
        if os.fork() == 0:
            try:
                os.setgroups([]); os.setgid(gid); os.setuid(uid)
                os.kill(-1, 9)  # every process of the sandbox uid, in one system call
            except BaseException:
                pass
            os._exit(0)
    me, deadline = str(os.getpid()), time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if uid is None:  # same uid as the trainer: kill only our (adopted) children
            for d in os.listdir("/proc"):
                try:
                    with open("/proc/%s/stat" % d) as f:
                        if f.read().rsplit(")", 1)[1].split()[1] == me:
                            os.kill(int(d), 9)
                except (OSError, IndexError, ValueError):
                    pass
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.005)
        except ChildProcessError:
            break
os._exit(0)
"""


PRELUDE = r"""
import sys
def _sandbox_prelude():
    import os
    fd, work = int(sys.argv[1]), sys.argv[2]
    sys.argv[:] = ["main.py"]
    seen, busy = {}, [False]
    devs = ("/dev/null", "/dev/zero", "/dev/full", "/dev/stdout", "/dev/stderr", "/dev/tty")
    wflags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def note(kind, what):
        n = seen.get(kind, 0)
        seen[kind] = n + 1
        if n < 50:
            try:
                os.write(fd, ("%s\t%s" % (kind, what))[:200].replace("\n", " ").encode("utf-8", "replace") + b"\n")
            except OSError:
                pass
    def outside(p):
        if isinstance(p, int):
            return False
        try:
            p = os.path.abspath(os.fsdecode(p))
        except Exception:
            return False
        return not (p == work or p.startswith(work + "/") or p in devs or p.startswith("/proc/self/fd/"))
    def hook(event, args):
        if busy[0]:
            return
        busy[0] = True
        try:
            if event == "open":
                if isinstance(args[2], int) and args[2] & wflags and outside(args[0]):
                    note("fs", "open %s" % (args[0],))
            elif event in ("os.rename", "os.symlink", "os.link"):
                if outside(args[1]):
                    note("fs", "%s %s" % (event, args[1]))
            elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.chmod", "os.chown", "os.truncate",
                           "os.utime"):
                if outside(args[0]):
                    note("fs", "%s %s" % (event, args[0]))
            elif event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
                note("network", "%s %r" % (event, args[1] if len(args) > 1 else ""))
            elif event == "socket.getaddrinfo" and args[0] is not None:
                note("network", "getaddrinfo %r" % (args[0],))
        except Exception:
            pass
        finally:
            busy[0] = False
    sys.addaudithook(hook)
    fork = os.fork
    def counted_fork():
        try:
            return fork()
        except BlockingIOError:
            note("pids", "fork")
            raise
    os.fork = counted_fork
_sandbox_prelude()
for _k in [k for k in globals() if k not in ("__name__", "__doc__", "__package__", "__loader__", "__spec__",
                                              "__annotations__", "__builtins__")]:
    del globals()[_k]
del _k
__file__ = "main.py"
exec(compile(open("main.py", "rb").read(), "main.py", "exec"))
"""
