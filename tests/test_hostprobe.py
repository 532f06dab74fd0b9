"""Host probes: which virtiofsd vng would pick and whether it can start, cached per boot of the host."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from vngtasks import arches, hostprobe

RUST_HELP = "Usage: virtiofsd [OPTIONS]\n      --shared-dir <shared_dir>\n      --sandbox <sandbox>\n"
C_HELP = "usage: virtiofsd [options]\n    -o source=PATH             shared directory tree\n"


def fake_virtiofsd(path: Path, help_text: str, version_status: int = 0) -> str:
    """An executable that answers --version (with `version_status`) and --help as a virtiofsd does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = --version ]; then echo "virtiofsd 1.0"; exit {version_status}; fi\n'
        f"cat <<'EOF'\n{help_text}EOF\n"
    )
    path.chmod(0o755)
    return str(path)


def test_qemus_c_daemon_that_answers_version_makes_vng_wait_so_9p_is_forced(tmp_path: Path) -> None:
    c_daemon = fake_virtiofsd(tmp_path / "qemu" / "virtiofsd", C_HELP)
    found = hostprobe.vng_virtiofsd([str(tmp_path / "missing"), c_daemon])
    assert found == hostprobe.Virtiofsd(c_daemon, usable=False)


def test_the_rust_daemon_is_used_as_vng_would(tmp_path: Path) -> None:
    rust = fake_virtiofsd(tmp_path / "libexec" / "virtiofsd", RUST_HELP)
    c_daemon = fake_virtiofsd(tmp_path / "qemu" / "virtiofsd", C_HELP)
    assert hostprobe.vng_virtiofsd([rust, c_daemon]) == hostprobe.Virtiofsd(rust, usable=True)


def test_a_daemon_whose_version_fails_is_skipped_as_vng_skips_it(tmp_path: Path) -> None:
    """Non-root, QEMU's C daemon fails --version: vng moves on, and so do we."""
    c_daemon = fake_virtiofsd(tmp_path / "qemu" / "virtiofsd", C_HELP, version_status=1)
    rust = fake_virtiofsd(tmp_path / "libexec" / "virtiofsd", RUST_HELP)
    assert hostprobe.vng_virtiofsd([c_daemon, rust]).path == rust
    assert hostprobe.vng_virtiofsd([c_daemon]) == hostprobe.Virtiofsd("", usable=False)


def test_candidates_follow_vngs_order(tmp_path: Path) -> None:
    on_path = fake_virtiofsd(tmp_path / "bin" / "virtiofsd", RUST_HELP)
    found = hostprobe.virtiofsd_candidates(tmp_path / "guest", str(tmp_path / "bin"))
    assert found[:2] == [str(tmp_path / "guest" / "bin" / "virtiofsd"), on_path]
    assert found[2:] == [p for p in hostprobe.VIRTIOFSD_PATHS if p]


def test_this_host_answers_with_what_vng_does_here(tmp_path: Path) -> None:
    """Debian 12 as root: QEMU's C daemon answers --version and cannot start, so 9p is forced."""
    probes = hostprobe.HostProbes(tmp_path)
    forced = probes.force_9p(os.environ["PATH"])
    picked = hostprobe.vng_virtiofsd(hostprobe.virtiofsd_candidates(hostprobe.guest_tools(), os.environ["PATH"]))
    assert forced is not picked.usable
    if Path("/usr/lib/qemu/virtiofsd").exists() and os.geteuid() == 0 and not shutil.which("virtiofsd"):
        assert forced and picked.path == "/usr/lib/qemu/virtiofsd"


def test_answers_are_kept_for_this_boot_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(
        hostprobe, "vng_virtiofsd", lambda c: calls.append("virtiofsd") or hostprobe.Virtiofsd("", False)
    )
    from vngtasks import accel

    monkeypatch.setattr(accel, "kvm_problem", lambda arch: calls.append("kvm") or "broken")
    host = arches.host()
    first = hostprobe.HostProbes(tmp_path)
    assert (first.force_9p(""), first.kvm_problem(host)) == (True, "broken")
    again = hostprobe.HostProbes(tmp_path)
    assert (again.force_9p(""), again.kvm_problem(host)) == (True, "broken")
    assert calls == ["virtiofsd", "kvm"]  # the second reader used the file
    saved = json.loads((tmp_path / hostprobe.PROBES_FILE).read_text())
    saved["boot_id"] = "an-earlier-boot"
    (tmp_path / hostprobe.PROBES_FILE).write_text(json.dumps(saved))
    hostprobe.HostProbes(tmp_path).force_9p("")
    assert calls == ["virtiofsd", "kvm", "virtiofsd"]
    (tmp_path / hostprobe.PROBES_FILE).write_text("{not json")
    assert hostprobe.HostProbes(tmp_path).kvm_problem(host) == "broken"
    assert calls[-1] == "kvm"


def elf(path: Path, machine: int, byte_order: str = "little") -> Path:
    """A file with an ELF header of `machine` (the rest does not matter to the check)."""
    data = 1 if byte_order == "little" else 2
    path.write_bytes(
        b"\x7fELF" + bytes([2, data, 1]) + bytes(9) + (2).to_bytes(2, byte_order) + machine.to_bytes(2, byte_order)
    )
    return path


def test_virtme_ng_init_is_used_only_when_built_for_this_host(tmp_path: Path) -> None:
    x86_64, arm64, s390x = (arches.lookup(name) for name in ("x86_64", "arm64", "s390x"))
    x86_init = elf(tmp_path / "x86", 62)
    assert hostprobe.runs_here(x86_init, x86_64) and not hostprobe.runs_here(x86_init, arm64)
    assert hostprobe.runs_here(elf(tmp_path / "arm", 183), arm64)
    assert hostprobe.runs_here(elf(tmp_path / "s390", 22, "big"), s390x)  # big-endian: read in its order
    (tmp_path / "script").write_text("#!/bin/sh\n")
    assert not hostprobe.runs_here(tmp_path / "script", x86_64) and not hostprobe.runs_here(tmp_path / "none", x86_64)
    # The wheel installed here ships an x86-64 binary: on this x86_64 host it runs.
    assert hostprobe.virtme_ng_init_runs(arches.host()) is (arches.host().name == "x86_64")


def test_boots_at_once_keep_each_other_s_answers_and_probe_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two boots of one matrix (or two invocations) read the file before either writes: neither's answer is lost
    (KVM found broken by a guest must stay broken for the next boot), and one probe serves both."""
    import threading
    import time

    from vngtasks import accel

    calls: list[str] = []

    def slow_probe(arch: arches.Arch) -> None:
        calls.append("kvm")
        time.sleep(0.2)

    monkeypatch.setattr(accel, "kvm_problem", slow_probe)
    monkeypatch.setattr(hostprobe, "vng_virtiofsd", lambda c: hostprobe.Virtiofsd("/v", True))
    host = arches.host()
    first, second = hostprobe.HostProbes(tmp_path), hostprobe.HostProbes(tmp_path)
    first.kvm_failed(host, "KVM internal error")
    assert second.force_9p("") is False
    kept = json.loads((tmp_path / hostprobe.PROBES_FILE).read_text())
    assert kept[f"kvm-{host.name}"].endswith("KVM internal error") and kept["virtiofsd"]["usable"] is True
    (tmp_path / hostprobe.PROBES_FILE).unlink()
    probes = [hostprobe.HostProbes(tmp_path) for _ in range(3)]
    threads = [threading.Thread(target=p.kvm_problem, args=(host,)) for p in probes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["kvm"]
