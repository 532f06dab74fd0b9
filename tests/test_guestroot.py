"""A foreign arch's guest root: its packages, its cache key, the unpacking, apt's private state (guestroot.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vngtasks import arches, deps, guestroot, kernels
from vngtasks.errors import BAD_INPUT, Failure

ARM64 = arches.lookup("arm64")
S390X = arches.lookup("s390x")
X86_64 = arches.lookup("x86_64")

# Real lines of `apt-get --print-uris install bash:arm64 linux-image-arm64:arm64` (Debian 12): an epoch
# escaped in the file name, and a signed kernel without a checksum.
PRINT_URIS = """\
Reading package lists...
The following NEW packages will be installed:
  bash busybox-static
'http://deb.debian.org/debian/pool/main/b/bash/bash_5.2.15-2%2bb9_arm64.deb' bash_5.2.15-2+b9_arm64.deb 1414112 MD5Sum:0b5e2f3a
'http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1%3a1.35.0-4%2bdeb12u1%2bb1_arm64.deb' busybox-static_1%3a1.35.0-4+deb12u1+b1_arm64.deb 822156 MD5Sum:77aa
'http://deb.debian.org/debian-security/pool/updates/main/l/linux-signed-arm64/linux-image-6.1.0-56-arm64_6.1.192-2_arm64.deb' linux-image-6.1.0-56-arm64_6.1.192-2_arm64.deb 59812568 {}
""".format("")  # noqa: E501


@pytest.mark.unit
@pytest.mark.parametrize("arch", [a for a in arches.ARCHES if a.debian_userland], ids=lambda a: a.name)
def test_packages_name_the_arch(arch: arches.Arch) -> None:
    names = guestroot.packages(arch)
    assert f"bash:{arch.dpkg_arch}" in names and f"busybox-static:{arch.dpkg_arch}" in names
    assert all(name.endswith(f":{arch.dpkg_arch}") for name in names)
    assert guestroot.refused(arch) is None


@pytest.mark.unit
def test_riscv64_is_refused_with_the_reason() -> None:
    why = guestroot.refused(arches.lookup("riscv64"))
    assert why is not None and "no riscv64 userland" in why and "\n" not in why
    with pytest.raises(Failure) as refused:
        guestroot.root_for_boot(Path("/nonexistent"), arches.lookup("riscv64"))
    assert refused.value.code == BAD_INPUT


@pytest.mark.unit
def test_print_uris_are_parsed_with_versions() -> None:
    debs = guestroot.parse_uris(PRINT_URIS)
    assert [(d.name, d.version) for d in debs] == [
        ("bash", "5.2.15-2+b9"),
        ("busybox-static", "1:1.35.0-4+deb12u1+b1"),
        ("linux-image-6.1.0-56-arm64", "6.1.192-2"),
    ]
    assert debs[2].hash == "" and debs[0].hash == "MD5Sum:0b5e2f3a"


@pytest.mark.unit
def test_root_key_follows_arch_and_every_version() -> None:
    debs = guestroot.parse_uris(PRINT_URIS)
    key = guestroot.root_key(ARM64, debs)
    assert key.startswith("arm64-") and len(key) == len("arm64-") + 16
    assert guestroot.root_key(ARM64, list(reversed(debs))) == key  # order does not matter
    assert guestroot.root_key(S390X, debs) != key
    newer = PRINT_URIS.replace("bash_5.2.15-2+b9", "bash_5.2.15-2+b10")
    assert guestroot.root_key(ARM64, guestroot.parse_uris(newer)) != key
    assert guestroot.root_key(ARM64, debs[:2]) != key


@pytest.mark.unit
def test_apt_keeps_to_its_own_state(tmp_path: Path) -> None:
    argv = guestroot.Apt(tmp_path, ARM64).argv("download", "bash:arm64")
    state = tmp_path / "apt-guest" / "arm64"
    assert argv[0] == "apt-get" and argv[-2:] == ["download", "bash:arm64"]
    assert "-oAPT::Architecture=arm64" in argv
    assert f"-oDir::State::Lists={state}/lists" in argv and "-oDir::State::status=/dev/null" in argv
    assert f"-oDir::Cache::Archives={state}/archives" in argv


def make_deb(where: Path, name: str, files: dict[str, str]) -> Path:
    tree = where / f"{name}-tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: arm64\nMaintainer: t <t@t>\nDescription: test\n"
    )
    for path, text in files.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(text)
    subprocess.run(["dpkg-deb", "-b", "-Zgzip", str(tree), str(where / f"{name}.deb")], check=True, capture_output=True)
    return where / f"{name}.deb"


@pytest.mark.unit
def test_unpack_once_makes_the_tree_whole_then_reuses_it(tmp_path: Path) -> None:
    debs = [make_deb(tmp_path, "a", {"bin/a": "A"}), make_deb(tmp_path, "b", {"usr/bin/b": "B"})]
    dest = tmp_path / "roots" / "arm64-key"
    assert guestroot.unpack_once(debs, dest) == dest
    assert (dest / "bin" / "a").read_text() == "A" and (dest / "usr" / "bin" / "b").read_text() == "B"
    assert not (dest / "DEBIAN").exists()
    assert not (dest / "etc" / "passwd").exists()  # only a root is finished as one
    assert [p.name for p in dest.parent.iterdir()] == ["arm64-key"]  # no temporary directory left
    (dest / "bin" / "a").write_text("kept")
    guestroot.unpack_once(debs, dest)  # a second run reuses it
    assert (dest / "bin" / "a").read_text() == "kept"


@pytest.mark.unit
def test_a_broken_package_leaves_no_root(tmp_path: Path) -> None:
    broken = tmp_path / "broken.deb"
    broken.write_bytes(b"not a deb")
    dest = tmp_path / "roots" / "arm64-key"
    with pytest.raises(Failure, match=r"broken\.deb"):
        guestroot.unpack_once([make_deb(tmp_path, "a", {"bin/a": "A"}), broken], dest)
    assert list(dest.parent.iterdir()) == []


@pytest.mark.unit
def test_current_root_is_the_last_one_made(tmp_path: Path) -> None:
    assert guestroot.current_root(tmp_path, ARM64) is None
    (tmp_path / guestroot.ROOTS / "arm64-k1").mkdir(parents=True)
    (tmp_path / guestroot.ROOTS / "arm64.current").write_text("arm64-k1\n")
    assert guestroot.current_root(tmp_path, ARM64) == tmp_path / guestroot.ROOTS / "arm64-k1"
    assert guestroot.current_root(tmp_path, S390X) is None


@pytest.mark.unit
def test_kernel_image_is_the_one_in_boot(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / "config-6.1.0-50-powerpc64le").write_text("")
    with pytest.raises(Failure, match="0 kernel images"):
        guestroot.kernel_image(tmp_path)
    (tmp_path / "boot" / "vmlinux-6.1.0-50-powerpc64le").write_text("")
    assert guestroot.kernel_image(tmp_path).name == "vmlinux-6.1.0-50-powerpc64le"


SECURITY_SYNCING = (
    "Failed to fetch http://deb.debian.org/debian-security/dists/bookworm-security/main/binary-ppc64el/Packages.xz"
    "  File has unexpected size (343384 != 363272). Mirror sync in progress?"
)
IGNORED = "Some index files failed to download. They have been ignored, or old ones used instead."


@pytest.mark.unit
def test_a_failed_index_of_another_arch_is_tolerated_the_hosts_is_not() -> None:
    assert deps.other_arch_indexes([SECURITY_SYNCING, IGNORED], X86_64) == ["ppc64el"]
    host_index = SECURITY_SYNCING.replace("binary-ppc64el", "binary-amd64")
    assert deps.other_arch_indexes([host_index, IGNORED], X86_64) == []
    assert deps.other_arch_indexes([SECURITY_SYNCING, host_index], X86_64) == []
    assert deps.other_arch_indexes(["Could not get lock /var/lib/dpkg/lock-frontend"], X86_64) == []
    assert deps.other_arch_indexes([], X86_64) == []


@pytest.mark.unit
def test_mountpoints_are_made_in_the_root_and_never_outside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "var").mkdir(parents=True)
    (root / "var" / "run").symlink_to(tmp_path / "host-run")  # as Debian's base-files has var/run -> /run
    guestroot.make_mountpoints(root, [Path("/work/project"), Path("/var/cache/runs/x")])
    assert (root / "work" / "project").is_dir() and (root / "var" / "cache" / "runs" / "x").is_dir()
    with pytest.raises(Failure, match="leads out of"):
        guestroot.make_mountpoints(root, [Path("/var/run/ws")])
    assert not (tmp_path / "host-run").exists()


# A busybox's bytes as far as finish_root reads them: its table of applet names amid other data.
FAKE_BUSYBOX = "\x7fELF\x02usage\0[\0[[\0cat\0env\0poweroff\0sh\0\x01\x02%s: applet not found\0"


@pytest.mark.unit
def test_a_runs_own_mountpoints_are_removed_after_it_and_the_workspaces_stay(tmp_path: Path) -> None:
    root, runs = tmp_path / "root", Path("/cache/runs")
    root.mkdir()
    guestroot.make_mountpoints(root, [Path("/work/project"), runs / "20261127-ab" / "shared"])
    guestroot.remove_mountpoints(root, runs / "20261127-ab" / "shared", runs)
    assert (root / "cache" / "runs").is_dir() and not (root / "cache" / "runs" / "20261127-ab").exists()
    assert (root / "work" / "project").is_dir()
    guestroot.remove_mountpoints(root, runs / "20261127-ab" / "shared", runs)  # gone already: nothing to do


@pytest.mark.unit
def test_a_root_gets_what_maintainer_scripts_would_make_and_busyboxs_commands(tmp_path: Path) -> None:
    files = {"etc/group": "kept:x:0:\n", "bin/busybox": FAKE_BUSYBOX, "bin/cat": "a package's cat"}
    dest = guestroot.unpack_once(
        [make_deb(tmp_path, "a", files)], tmp_path / "roots" / "arm64-key", guestroot.finish_root
    )
    assert (dest / "etc" / "passwd").read_text().startswith("root:x:0:0:")
    assert (dest / "etc" / "group").read_text() == "kept:x:0:\n"  # a package's file wins
    assert all((dest / name).is_dir() for name in ("opt", "srv", "tmp"))
    for name in ("[", "[[", "env", "poweroff", "sh"):
        assert (dest / "bin" / name).readlink() == Path("busybox")
    assert (dest / "bin" / "cat").read_text() == "a package's cat"
    assert (dest / "usr" / "bin" / "env").readlink() == Path("../../bin/busybox")  # inside the root, not the host's
    assert not (dest / "bin" / "applet not found").exists()
    for name in ("sbin/udevd", "sbin/udevadm"):  # vng's init runs them: udev's stand-ins, run by the guest's sh
        assert (dest / name).read_text().startswith("#!/bin/sh\n") and (dest / name).stat().st_mode & 0o777 == 0o755


@pytest.mark.unit
def test_a_root_without_busyboxs_table_of_applets_is_not_made(tmp_path: Path) -> None:
    deb = make_deb(tmp_path, "a", {"bin/busybox": "\x7fELF not a busybox"})
    with pytest.raises(Failure, match="bin/busybox: no table of applet names"):
        guestroot.unpack_once([deb], tmp_path / "roots" / "arm64-key", guestroot.finish_root)
    assert not (tmp_path / "roots" / "arm64-key").exists()


@pytest.mark.integration
def test_the_applets_read_from_busybox_are_those_it_lists() -> None:
    """The host's busybox-static (invoke deps installs it) is the same build as a guest's, of another arch."""
    binary = shutil.which("busybox")
    assert binary, "invoke deps installs busybox-static"
    listed = subprocess.run([binary, "--list"], capture_output=True, text=True, check=True).stdout.split()
    assert guestroot.busybox_applets(Path(binary).read_bytes()) == sorted(listed)


@pytest.mark.unit
def test_a_foreign_boot_without_a_kernel_boots_debians_kernel_of_that_arch(tmp_path: Path) -> None:
    with pytest.raises(Failure, match="no arm64 kernel unpacked yet: `invoke deps --arch arm64`") as refused:
        kernels.default_kernel(ARM64, tmp_path, unpack=False)  # a dry run makes nothing
    assert refused.value.code == BAD_INPUT and not (tmp_path / guestroot.KERNELS).exists()
    for version in ("6.1.0-50", "6.1.0-56"):
        boot = tmp_path / guestroot.KERNELS / f"linux-image-{version}-arm64_6.1_arm64" / "boot"
        boot.mkdir(parents=True)
        (boot / f"vmlinuz-{version}-arm64").write_bytes(b"MZ")
    (tmp_path / guestroot.KERNELS / "linux-image-6.1.0-50-s390x_6.1_s390x" / "boot").mkdir(parents=True)
    assert kernels.default_kernel(ARM64, tmp_path).name == "vmlinuz-6.1.0-56-arm64"  # the one unpacked last
    with pytest.raises(Failure, match="no riscv64 userland") as riscv:
        kernels.default_kernel(arches.lookup("riscv64"), tmp_path)
    assert riscv.value.code == BAD_INPUT


def package_tree(tmp_path: Path, **links: str) -> Path:
    """A root as packages unpacked it (a busybox), with `links` (path: target) a package placed."""
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "busybox").write_text(FAKE_BUSYBOX)
    for path, target in links.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).symlink_to(target)
    return tree


@pytest.mark.unit
def test_a_root_is_never_finished_through_a_link_a_package_placed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    tree = package_tree(tmp_path, **{"etc/passwd": str(outside / "passwd")})  # dangling: open() would create it
    guestroot.finish_root(tree)
    assert not (outside / "passwd").exists() and (tree / "etc" / "passwd").is_symlink()
    for name, target in (("sbin", outside), ("tmp", outside / "gone")):
        tree = package_tree(tmp_path / name, **{name: str(target)})
        with pytest.raises(Failure, match=r"^guest root: .*: nothing made through a link"):
            guestroot.finish_root(tree)
    assert list(outside.iterdir()) == []  # no udevd or udevadm out here
