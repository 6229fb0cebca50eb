"""The cached guest image: Debian bookworm + every package the roles use.

Guests have no route to package registries, so every Debian package a role
installs is baked in here (the roles' package tasks then find them present,
as on a prepared real host). The image is built once, keyed by a hash of its
recipe, and kept outside the repository; guests boot copy-on-write overlays.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .util import cache_dir, log, run

GUEST_FILES = Path(__file__).parent / "guest"
UML_MODULES = Path("/usr/lib/uml/modules")
MIRROR = os.environ.get("OPENCLB_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"

# Every Debian package any role installs, plus what the lab itself needs.
PACKAGES = [
    # base system and lab plumbing
    "systemd-sysv", "udev", "kmod", "iproute2", "openssh-server", "netbase", "procps",
    "iputils-ping", "ca-certificates", "openssl", "curl", "socat", "less", "tcpdump",
    "python3", "python3-venv", "python3-apt", "python3-packaging",
    # L4 tier
    "keepalived", "ipvsadm", "conntrackd", "conntrack", "iptables", "ipset",
    # L7 tier
    "nginx", "prometheus-nginx-exporter",
    # key servers and their clients
    "softhsm2", "p11-kit", "p11-kit-modules", "stunnel4", "libengine-pkcs11-openssl", "opensc", "gnutls-bin",
]
# Services the packages enable on install: disabled, the roles enable what a node needs.
DISABLED_SERVICES = ["nginx", "keepalived", "conntrackd", "stunnel4", "prometheus-nginx-exporter"]
# Units a lab guest never needs (no consoles to log in on, no clock to sync, no apt timers).
MASKED_UNITS = [
    "getty@tty1.service", "serial-getty@ttyS0.service", "console-getty.service",
    "systemd-timesyncd.service", "apt-daily.timer", "apt-daily-upgrade.timer",
    "e2scrub_all.timer", "fstrim.timer", "e2scrub_reap.service", "getty-static.service",
    "ipvsadm.service",  # Debian's boot-time rule loader: IPVS state belongs to keepalived and the modules
]
IMAGE_SIZE = "3G"
RECIPE_VERSION = "6"  # bump when the customisation below changes


def uml_kernel_version() -> str:
    versions = sorted(p.name for p in UML_MODULES.iterdir()) if UML_MODULES.is_dir() else []
    if not versions:
        raise SystemExit("no UML kernel modules under /usr/lib/uml/modules: run `make deps` (apt user-mode-linux)")
    return versions[-1]


def recipe_key() -> str:
    h = hashlib.sha256()
    h.update(RECIPE_VERSION.encode())
    h.update(" ".join(PACKAGES + DISABLED_SERVICES + MASKED_UNITS).encode())
    h.update(uml_kernel_version().encode())
    for f in sorted(GUEST_FILES.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    h.update(lab_key_path().with_suffix(".pub").read_bytes())
    return h.hexdigest()[:12]


def lab_key_path() -> Path:
    return cache_dir() / "lab_key"


def ensure_lab_key() -> Path:
    """A lab-only ssh key; it opens only the lab's guests."""
    key = lab_key_path()
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "openclb-lab", "-f", str(key)])
    return key


def image_path() -> Path:
    return cache_dir() / "images" / f"base-{recipe_key()}.img"


def ensure_image() -> Path:
    ensure_lab_key()
    img = image_path()
    if img.exists():
        log(f"guest image: cached {img}")
        return img
    if os.geteuid() != 0:
        raise SystemExit("building the guest image needs root (debootstrap)")
    img.parent.mkdir(parents=True, exist_ok=True)
    build = cache_dir() / "build"
    build.mkdir(parents=True, exist_ok=True)
    # The debootstrap tree depends only on the package list: kept, so a change
    # of the customisation below rebuilds in seconds, not minutes.
    rootfs = build / f"rootfs-{hashlib.sha256(' '.join(PACKAGES).encode()).hexdigest()[:12]}"
    t0 = time.monotonic()
    if not (rootfs / ".openclb-debootstrap-done").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        log(f"guest image: debootstrap {SUITE} with {len(PACKAGES)} packages (about 2-4 minutes, once) ...")
        run(["debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES), SUITE, str(rootfs), MIRROR],
            progress="debootstrap")
        (rootfs / ".openclb-debootstrap-done").touch()
    log("guest image: customising (UML modules, early network, sshd, lab key) ...")
    customise(rootfs)
    tmp = img.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    run(["truncate", "-s", IMAGE_SIZE, str(tmp)])
    run(["mkfs.ext4", "-q", "-F", "-L", "openclb-root", "-d", str(rootfs), str(tmp)])
    os.replace(tmp, img)  # atomically: a half-built image is never used
    # Older images are kept: running guests (of other labs) still read theirs.
    # `make clean-cache` removes them.
    log(f"guest image: built {img} in {time.monotonic() - t0:.0f} s")
    return img


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def customise(root: Path) -> None:
    kver = uml_kernel_version()
    mods = root / "lib" / "modules" / kver
    shutil.rmtree(mods, ignore_errors=True)
    shutil.copytree(UML_MODULES / kver, mods, symlinks=True)

    # early network from the kernel command line; the ubd queue kicker
    # (its docstring says why)
    wants = root / "etc/systemd/system/sysinit.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for name in ("openclb-lab-net", "openclb-lab-ubd-kick"):
        shutil.copy(GUEST_FILES / name, root / "usr/local/sbin" / name)
        (root / "usr/local/sbin" / name).chmod(0o755)
        shutil.copy(GUEST_FILES / f"{name}.service", root / f"etc/systemd/system/{name}.service")
        link = wants / f"{name}.service"
        if not link.is_symlink():
            link.symlink_to(f"/etc/systemd/system/{name}.service")

    # The kernel mounts the root read-write (`rw`); an fstab entry would only make
    # systemd wait for udev to announce the device.
    _write(root / "etc/fstab", "")
    _write(root / "etc/hosts", "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n")
    _write(root / "root/.ssh/authorized_keys", lab_key_path().with_suffix(".pub").read_text(), 0o600)
    (root / "root/.ssh").chmod(0o700)
    _write(root / "etc/ssh/sshd_config.d/openclb-lab.conf",
           "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\nMaxStartups 64:30:128\n")
    # iptables-legacy: the UML kernel lacks nftables' ip/ip6/inet families.
    # update-alternatives moves the slave links too (iptables-restore, -save).
    for tool in ("iptables", "ip6tables"):
        run(["chroot", str(root), "update-alternatives", "--set", tool, f"/usr/sbin/{tool}-legacy"])
    # journald keeps logs in memory (small, fast).
    _write(root / "etc/systemd/journald.conf.d/openclb-lab.conf", "[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n")
    units = root / "etc/systemd/system"
    for service in DISABLED_SERVICES:
        for wants_dir in units.glob("*.wants"):
            (wants_dir / f"{service}.service").unlink(missing_ok=True)
    for unit in MASKED_UNITS:
        masked = units / unit
        masked.unlink(missing_ok=True)
        masked.symlink_to("/dev/null")
    (root / "etc/machine-id").write_text("")  # a fresh id per guest boot
    # The distribution's defaults would answer on port 80 of every guest.
    (root / "etc/nginx/sites-enabled/default").unlink(missing_ok=True)


def main() -> None:
    try:
        print(ensure_image())
    except subprocess.CalledProcessError as e:
        sys.exit(f"image build failed: {e}")


if __name__ == "__main__":
    main()
