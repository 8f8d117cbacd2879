"""Production-like Debian 12 test hosts: systemd-nspawn containers, each on its own veth link.

Each host boots a cached debootstrap image through an overlay (or a copy) under
<workdir>/<name>/tree/root, runs systemd, sshd and nginx, and is reached at
10.231.<index>.2 (and fd42:fd:<index>::2) from the host side's 10.231.<index>.1
(fd42:fd:<index>::1). NspawnHost.run() enters the container's namespaces with
nsenter rather than ssh, so it still works when a test has broken sshd or the
network. Needs root.

A host is fresh the way a new VPS is: root logs in with a key, and there is no
deploy user and no sudo rule; `fab -H root@host provision` makes them. The
image also holds what later steps need offline (the hosts have no network
beyond their veth): Apache, PostgreSQL, certbot and a compiler are installed
but not running, as a cloud image with them preinstalled would be.
"""

import concurrent.futures
import contextlib
import fcntl
import os
import pathlib
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from typing import Iterator

MIRROR = "http://deb.debian.org/debian"
PACKAGES = ["systemd", "systemd-sysv", "dbus", "openssh-server", "nginx", "python3",
            "python3-venv", "sudo", "iproute2", "ca-certificates", "logrotate", "sqlite3"]
# For what provision sets up later, offline: ACME, one database for a fleet, Apache in
# front, and mod_wsgi built against it. Installed by apt in the new root (debootstrap's
# own resolver does not follow virtual packages, which certbot's dependencies need).
LATER_PACKAGES = ["certbot", "python3-certbot-nginx", "postgresql", "apache2", "apache2-dev", "gcc",
                  "python3-dev"]
# Installed, but not started at boot: provision enables what a host's settings need.
DISABLED_UNITS = ["apache2.service", "postgresql.service", "certbot.timer"]
# Bump when the image recipe changes, so stale caches are rebuilt instead of reused.
IMAGE_VERSION = "5"
MARKER = ".fabdeploy-image"
DEFAULT_CACHE = "/var/cache/fabdeploy-test/bookworm"
# Units that hang, fail or reach for the internet in a container without real hardware.
MASKED_UNITS = ["systemd-networkd-wait-online.service", "systemd-timesyncd.service",
                "apt-daily.timer", "apt-daily-upgrade.timer", "console-getty.service"]
HOST_TOOLS = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container",
              "ip": "iproute2", "ssh": "openssh-client", "ssh-keygen": "openssh-client",
              "nsenter": "util-linux", "chattr": "e2fsprogs"}
SUBNET_LOCK = pathlib.Path("/run/fabdeploy-nspawn.lock")
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class CommandError(subprocess.CalledProcessError):
    """A failed command whose message includes its stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{(self.stderr or '').strip()}"


def run_argv(*argv, check=True, **kwargs) -> subprocess.CompletedProcess:
    """Run argv (no shell) and capture its output as text."""
    result = subprocess.run([str(a) for a in argv], text=True, capture_output=True, **kwargs)
    if check and result.returncode:
        raise CommandError(result.returncode, result.args, result.stdout, result.stderr)
    return result


def ensure_host_tools() -> None:
    """Install the host packages this harness needs, since CI starts from a bare machine."""
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if not shutil.which(tool)})
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run_argv("apt-get", "update", env=env)
        # With recommends: debootstrap needs debian-archive-keyring to verify the archive.
        run_argv("apt-get", "install", "-y", *missing, env=env)


@contextlib.contextmanager
def file_lock(path: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive flock on path, serialising work across processes."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def mounts_under(path: pathlib.Path) -> list[str]:
    """Return mount points at or below path, deepest first."""
    prefix = str(path.resolve())
    points = []
    for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
        # mountinfo escapes spaces and friends as octal, e.g. \040.
        point = re.sub(r"\\(\d{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def remove_tree(path: pathlib.Path) -> None:
    """Delete a container tree, undoing mounts and immutable flags that would block rm."""
    if not path.exists():
        return
    for point in mounts_under(path):
        run_argv("umount", "--lazy", point, check=False)
    if mounts_under(path):
        raise RuntimeError(f"refusing to delete {path}: still mounted {mounts_under(path)}")
    # Tests chattr +i parts of a host from outside; rm cannot delete those until undone.
    run_argv("chattr", "-R", "-f", "-i", "-a", path, check=False)
    # --one-file-system: a mount we missed must never let rm walk into the host.
    run_argv("rm", "-rf", "--one-file-system", path)


def base_image() -> pathlib.Path:
    """Debootstrap Debian 12 once into the cache dir and return it."""
    ensure_host_tools()  # also what hosts need besides debootstrap, so check every time
    cache = pathlib.Path(os.environ.get("FABDEPLOY_IMAGE_CACHE", DEFAULT_CACHE))
    if image_complete(cache):
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(cache.with_name(cache.name + ".lock")):
        if image_complete(cache):  # another process built it while we waited
            return cache
        for stale in cache.parent.glob(cache.name + ".*-*"):
            remove_tree(stale)  # from a killed earlier build; we hold the lock, nobody owns it
        build = pathlib.Path(tempfile.mkdtemp(prefix=cache.name + ".build-", dir=cache.parent))
        build.chmod(0o755)  # mkdtemp's 0700 would lock every non-root user out of "/"
        debootstrap(build)
        customise_image(build)
        (build / MARKER).write_text(IMAGE_VERSION + "\n")
        old = cache.with_name(cache.name + ".old-" + build.name[-8:])
        if cache.exists():  # incomplete or outdated: move it aside, swap, then delete it
            cache.rename(old)
        build.rename(cache)
        remove_tree(old)
    return cache


def image_complete(cache: pathlib.Path) -> bool:
    """True when cache holds a finished image of the current recipe."""
    marker = cache / MARKER
    return marker.is_file() and marker.read_text().strip() == IMAGE_VERSION


def debootstrap(root: pathlib.Path) -> None:
    """Install a bookworm system with our packages into root."""
    run_argv("debootstrap", "--include=" + ",".join(PACKAGES), "bookworm", root, MIRROR)
    # No service starts while the image is made: policy-rc.d's 101 says "not now".
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        env = {"PATH": CONTAINER_PATH, "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8"}
        run_argv("chroot", root, "apt-get", "update", env=env)
        run_argv("chroot", root, "apt-get", "install", "-y", "--no-install-recommends", *LATER_PACKAGES, env=env)
    finally:
        policy.unlink()


def customise_image(root: pathlib.Path) -> None:
    """Apply the settings every test host shares: a VPS as its provider hands it over."""
    (root / "etc/ssh/sshd_config.d/fabdeploy.conf").write_text(
        "HostKey /etc/ssh/ssh_host_ed25519_key\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # each host generates its own, so hosts never share an identity
    # The image's own systemctl: a bare CI host need not have systemd installed.
    run_argv("chroot", root, "systemctl", "enable", "ssh.service", "nginx.service")
    run_argv("chroot", root, "systemctl", "mask", *MASKED_UNITS)
    run_argv("chroot", root, "systemctl", "disable", *DISABLED_UNITS)
    # Apache's placeholder page would shadow nginx's own in their shared docroot.
    (root / "var/www/html/index.html").unlink(missing_ok=True)
    (root / "etc/hostname").write_text("fabdeploy-image\n")
    # debootstrap copied the build host's resolver, unreachable from a test host; with none,
    # lookups fail at once instead of timing out, and nothing reaches for the internet.
    (root / "etc/resolv.conf").write_text("# test hosts are offline: no DNS\n")
    (root / "etc/machine-id").write_text("")  # hosts get their own; see NspawnHost
    run_argv("chroot", root, "apt-get", "clean")  # downloaded .debs would only slow every copy


def own_cgroups() -> dict[str, pathlib.Path]:
    """This process's cgroup directories in the cgroup2 and name=systemd hierarchies."""
    paths = {}
    for line in pathlib.Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        paths["cgroup2" if controllers == "" else controllers] = path
    found: dict[str, pathlib.Path] = {}
    for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype, options = fields[fields.index("-") + 1], fields[fields.index("-") + 3]
        name = "name=systemd" if "name=systemd" in options.split(",") else fstype
        if name in ("cgroup2", "name=systemd") and name in paths and name not in found:
            inside = paths[name][len(fields[3].rstrip("/")):]  # the mount may show a subtree
            found[name] = pathlib.Path(fields[4] + inside)
    return found


def remove_cgroup(path: pathlib.Path) -> None:
    """Remove a cgroup and the ones systemd and nspawn made below it, deepest first."""
    for sub in sorted(path.glob("**/"), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not there, or (wrongly) still busy
            sub.rmdir()


def used_subnets() -> set[int]:
    """Third octets of the 10.231.x.0/30 subnets already on a host interface."""
    out = run_argv("ip", "-4", "-o", "addr", "show").stdout
    return {int(m) for m in re.findall(r"inet 10\.231\.(\d+)\.", out)}


class NspawnHost:
    """One booted Debian 12 container reachable at 10.231.<index>.2 over a veth pair."""

    user = "deploy"  # made by provision, not by the image

    def __init__(self, name: str, index: int, workdir: pathlib.Path):
        if not 0 <= index <= 255:
            raise ValueError(f"subnet index {index} is outside 0..255")
        token = secrets.token_hex(3)  # unique names even next to other or leftover runs
        self.name, self.index = name, index
        self.machine = f"fdt-{token}-{index}"  # machine and netns name
        self.veth = f"fdt{token}h{index}"  # host side; at most 13 of the 15 allowed chars
        self.gateway, self.address = f"10.231.{index}.1", f"10.231.{index}.2"
        self.gateway6, self.address6 = f"fd42:fd:{index}::1", f"fd42:fd:{index}::2"
        self.host_string = f"{self.user}@{self.address}"
        self.dir = pathlib.Path(workdir) / name
        self.tree = self.dir / "tree"  # everything stop() deletes
        self.root = self.tree / "root"
        self.key_file = self.dir / "deploy_key"
        self.root_key_file = self.dir / "root_key"
        self.known_hosts = self.dir / "known_hosts"
        self.log_file = self.dir / "boot.log"
        self.proc: subprocess.Popen | None = None
        self.leader_pid: int | None = None
        self.cgroups: list[pathlib.Path] = []
        self.root_inode = ""
        self._leader_ns = 0
        self._network = False
        self._owns_tree = False

    def __repr__(self) -> str:
        return f"<NspawnHost {self.name} {self.address} {self.machine}>"

    def url(self, path: str = "/", ipv6: bool = False) -> str:
        """HTTP URL of path on this host's nginx (over IPv6: its ULA)."""
        return f"http://[{self.address6}]{path}" if ipv6 else f"http://{self.address}{path}"

    def start(self) -> "NspawnHost":
        """Copy, customise, wire up and boot the container; return once ssh works."""
        image = base_image()
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.tree.exists():  # never reuse, nor later delete, a tree we did not create
            raise FileExistsError(f"{self.tree} exists; use a fresh workdir")
        try:
            self._owns_tree = True
            self.copy_image(image)
            self.make_keys()
            self.customise_copy()
            if not self._network:  # nspawn_hosts claims subnets itself, all under one lock
                with file_lock(SUBNET_LOCK):
                    self.claim_network()
            self.boot()
            self.wait_for_ssh()
        except BaseException:
            self.stop()
            raise
        return self

    def copy_image(self, image: pathlib.Path) -> None:
        """Give the host a writable root of its own: an overlay on the image, else a copy."""
        # The overlay mounts in milliseconds; cp -a of the image took 1-11 s here, varying
        # with disk load. cp stays for hosts that refuse an overlay, e.g. CI inside Docker.
        upper, work = self.tree / "upper", self.tree / "work"
        for path in (upper, work, self.root):
            path.mkdir(parents=True)
        options = f"lowerdir={image},upperdir={upper},workdir={work}"
        mount = run_argv("mount", "-t", "overlay", "overlay", "-o", options, self.root, check=False)
        if mount.returncode:
            self.root.rmdir()
            run_argv("cp", "-a", "--reflink=auto", image, self.root)

    def make_keys(self) -> None:
        """Create login keys for deploy and root, and this host's own host key."""
        host_key = self.root / "etc/ssh/ssh_host_ed25519_key"
        for key in (self.key_file, self.root_key_file, host_key):
            key.unlink(missing_ok=True)  # ssh-keygen would otherwise ask before overwriting
            run_argv("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.name, "-f", key)
        kind, blob = host_key.with_suffix(".pub").read_text().split()[:2]
        self.known_hosts.write_text(f"{self.address} {kind} {blob}\n")

    def customise_copy(self) -> None:
        """Give the copy its identity: name, machine id and authorized keys."""
        (self.root / "etc/hostname").write_text(self.name + "\n")
        # sudo warns on every call when the hostname does not resolve.
        (self.root / "etc/hosts").write_text(
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{self.name}\n::1\tlocalhost ip6-localhost\n")
        (self.root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        self.authorize(self.root_key_file, "root", "root")

    def authorize(self, key: pathlib.Path, home: str, owner: str) -> None:
        """Install key's public half as owner's authorized_keys with sshd-approved modes."""
        uid, gid = container_ids(self.root, owner)
        ssh_dir = self.root / home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        keys = ssh_dir / "authorized_keys"
        keys.write_text(key.with_suffix(".pub").read_text())
        keys.chmod(0o600)
        for path in (ssh_dir, keys):
            os.chown(path, uid, gid)

    def claim_network(self) -> None:
        """Create and address netns and veth pair (caller holds SUBNET_LOCK)."""
        # Addressed from outside before boot, so no service in the container has to.
        if self.index in used_subnets():
            raise RuntimeError(f"subnet 10.231.{self.index}.0/30 is already in use")
        run_argv("ip", "netns", "add", self.machine)
        self._network = True
        run_argv("ip", "link", "add", self.veth, "type", "veth",
                 "peer", "name", "eth0", "netns", self.machine)
        run_argv("ip", "addr", "add", f"{self.gateway}/30", "dev", self.veth)
        # nodad: usable at once, not after duplicate address detection's second or two.
        run_argv("ip", "-6", "addr", "add", f"{self.gateway6}/64", "dev", self.veth, "nodad")
        run_argv("ip", "link", "set", self.veth, "up")
        for argv in (["addr", "add", f"{self.address}/30", "dev", "eth0"],
                     ["-6", "addr", "add", f"{self.address6}/64", "dev", "eth0", "nodad"],
                     ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
            run_argv("ip", "-n", self.machine, *argv)

    def boot(self) -> None:
        """Start systemd-nspawn in a cgroup of its own, in the background."""
        argv = ["systemd-nspawn", "-b", "--register=no", "--keep-unit", "--console=read-only",
                "--resolv-conf=off",
                f"--network-namespace-path=/run/netns/{self.machine}",
                "-D", str(self.root), "--machine", self.machine]
        # With --keep-unit nspawn puts the container in <its cgroup>/payload. Two containers
        # sharing one cgroup then share payload/system.slice/..., and each systemd removes
        # the other's cgroups: units fail at random with status 219/CGROUP.
        self.cgroups = [path / self.machine for path in own_cgroups().values()]
        stat = self.root.stat()
        self.root_inode = f"{stat.st_dev}:{stat.st_ino}"
        script = "".join(f"mkdir {shlex.quote(str(c))} && echo $$ > "
                         f"{shlex.quote(str(c / 'cgroup.procs'))} && " for c in self.cgroups)
        env = dict(os.environ, TERM="dumb")  # plain boot log, without colour escapes
        with open(self.log_file, "wb") as log:
            self.proc = subprocess.Popen(["sh", "-c", script + "exec " + shlex.join(argv)],
                                         stdin=subprocess.DEVNULL, stdout=log, env=env,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for_ssh(self, timeout: float = 60) -> None:
        """Poll until root can log in with strict host key checking."""
        deadline = time.monotonic() + timeout
        while self.ssh("true", root=True, check=False, connect_timeout=2).returncode != 0:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.machine}: nspawn exited {self.proc.returncode}\n"
                                   + self.log_tail())
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.machine}: no ssh after {timeout}s\n" + self.log_tail())
            time.sleep(0.25)
        self.note_leader()
        if self.leader_pid is None:
            raise RuntimeError(f"{self.machine}: cannot find the container's init process")

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of the boot log, for error messages."""
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def ssh(self, command: str, root=False, check=True, connect_timeout=10
            ) -> subprocess.CompletedProcess:
        """Run a shell command over real ssh as deploy (or root), checking the host key strictly."""
        key, user = (self.root_key_file, "root") if root else (self.key_file, self.user)
        # -F /dev/null: the invoking user's ssh config must not change what the tests see.
        return run_argv("ssh", "-F", "/dev/null", "-i", key, "-o", "IdentitiesOnly=yes",
                        "-o", f"UserKnownHostsFile={self.known_hosts}",
                        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                        "-o", f"ConnectTimeout={connect_timeout}", "-o", "LogLevel=ERROR",
                        f"{user}@{self.address}", command, check=check)

    def run(self, command: str, check=True) -> subprocess.CompletedProcess:
        """Run a shell command as root inside the container, via nsenter, not ssh."""
        # nsenter keeps working when a test breaks sshd or the network on purpose.
        if self.leader_pid is None:
            raise RuntimeError(f"{self.machine} is not running")
        return run_argv("nsenter", f"--target={self.leader_pid}", "--mount", "--uts", "--ipc",
                        "--net", "--pid", "--cgroup", "--root", "--wd",
                        "env", "-i", f"PATH={CONTAINER_PATH}", "HOME=/root", "LANG=C.UTF-8",
                        "/bin/sh", "-c", command, check=check)

    def stop(self) -> None:
        """Power off, then remove network and tree; safe twice and after a partial start."""
        self.power_off()
        self.remove_nspawn_state()
        self.remove_network()
        if self._owns_tree:
            remove_tree(self.tree)
            self._owns_tree = False

    def power_off(self, timeout: float = 30) -> None:
        """Ask for an orderly shutdown, then kill what is left by PID."""
        if self.proc is None:
            return
        if self.leader_pid is None and self.proc.poll() is None:
            self.note_leader()  # e.g. boot timed out before we looked
        if self.proc.poll() is None:
            # nspawn turns SIGTERM into SIGRTMIN+3 for the container's systemd: a clean halt.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.kill_leader()

    def note_leader(self) -> None:
        """Remember the PID and PID namespace of the container's init: nspawn's only child."""
        children = pathlib.Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError, ValueError):  # not forked yet, or gone already
            pid = int(children.read_text())
            self._leader_ns = os.stat(f"/proc/{pid}/ns/pid").st_ino
            self.leader_pid = pid

    def kill_leader(self, timeout: float = 10) -> None:
        """SIGKILL the container's init if it outlived nspawn, as it does a SIGKILLed nspawn."""
        deadline = time.monotonic() + timeout
        while self.leader_pid and time.monotonic() < deadline:
            try:  # the namespace check guards against a recycled PID
                if os.stat(f"/proc/{self.leader_pid}/ns/pid").st_ino != self._leader_ns:
                    break
                os.kill(self.leader_pid, signal.SIGKILL)  # a PID namespace dies with its init
            except OSError:
                break  # gone
            time.sleep(0.1)
        self.leader_pid = None

    def remove_nspawn_state(self) -> None:
        """Remove our cgroups, and what a killed nspawn leaves in /run (or on a non-tmpfs /run)."""
        for cgroup in self.cgroups:
            remove_cgroup(cgroup)
        with contextlib.suppress(OSError):
            pathlib.Path("/run/systemd/nspawn/propagate", self.machine).rmdir()
        if self.root_inode:  # nspawn's lock on the tree, named after its device and inode
            lock = pathlib.Path(f"/run/systemd/nspawn/locks/inode-{self.root_inode}")
            lock.unlink(missing_ok=True)

    def remove_network(self) -> None:
        """Delete the netns (which takes the veth pair with it) and any surviving host veth."""
        if self._network:
            run_argv("ip", "netns", "del", self.machine, check=False)
        if pathlib.Path("/sys/class/net", self.veth).exists():
            run_argv("ip", "link", "del", self.veth, check=False)
        self._network = False


def container_ids(root: pathlib.Path, user: str) -> tuple[int, int]:
    """uid and gid of user in the container's own /etc/passwd, not the host's."""
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise KeyError(f"no user {user} in {root}/etc/passwd")


def route_between(hosts: list[NspawnHost]) -> None:
    """Let these hosts reach each other (opt-in, e.g. an app host its database host).

    Each routes 10.231.0.0/16 through its gateway, and the test machine
    forwards what arrives on their veths. Nothing global changes: IPv4
    forwards a packet when the interface it came in on allows it, and that
    setting goes away with the veth when the host stops.
    """
    for host in hosts:
        pathlib.Path(f"/proc/sys/net/ipv4/conf/{host.veth}/forwarding").write_text("1\n")
        run_argv("ip", "-n", host.machine, "route", "replace", "10.231.0.0/16", "via", host.gateway)


@contextlib.contextmanager
def nspawn_hosts(n: int, workdir: pathlib.Path) -> Iterator[list[NspawnHost]]:
    """Start n hosts in parallel; always stop all of them."""
    base_image()  # build once here, not n times racing on the lock
    hosts: list[NspawnHost] = []
    try:
        # Pick and claim subnets under one lock, so parallel runs never pick the same ones.
        with file_lock(SUBNET_LOCK):
            free = sorted(set(range(1, 255)) - used_subnets())
            if len(free) < n:
                raise RuntimeError(f"only {len(free)} free 10.231.x.0/30 subnets, need {n}")
            for i, index in enumerate(free[:n]):
                hosts.append(NspawnHost(f"host{i + 1}", index, workdir))
                hosts[-1].claim_network()
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(n, 1)) as pool:
            list(pool.map(NspawnHost.start, hosts))
        yield hosts
    finally:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(n, 1)) as pool:
            list(pool.map(NspawnHost.stop, hosts))
