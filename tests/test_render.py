"""Golden files of every rendered command: VNGTASKS_REGEN_GOLDEN=1 rewrites them; review the diff."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vngtasks import arches, buildsteps, kconfig, kernelmake, render, vm
from vngtasks.arches import Arch
from vngtasks.settings import DEFAULTS, effective
from vngtasks.validate import InputError

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("VNGTASKS_REGEN_GOLDEN") == "1"
X86_64 = arches.lookup("x86_64")
RUN_DIR = Path("/cache/vngtasks/runs/golden")
WORKSPACE = Path("/work/project")

VARIANTS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    # name: (settings flags, host environment)
    "defaults": ({"cpus": "2", "extra_rwdirs": ""}, {}),
    "options": (
        {
            "cpus": "4",
            "memory": "2G",
            "network": "user",
            "verbose": "false",
            "append": "mitigations=off nokaslr",
            "qemu_opts": "-cpu host -device virtio-rng-pci",
            "workspace_rw": "false",
            "extra_rwdirs": "/tmp",
        },
        {
            "GITHUB_OUTPUT": "/home/runner/work/_temp/_runner_file_commands/set_output_1",
            "GITHUB_STEP_SUMMARY": "/home/runner/work/_temp/_runner_file_commands/step_summary_1",
        },
    ),
}


def check_golden(name: str, lines: list[str]) -> None:
    path = GOLDEN / name
    text = "\n".join(lines) + "\n"
    if REGEN:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with VNGTASKS_REGEN_GOLDEN=1"
    assert path.read_text() == text, f"{name} changed: regenerate with VNGTASKS_REGEN_GOLDEN=1 and review"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("accel", ["kvm", "tcg"])
@pytest.mark.parametrize("arch", arches.ARCHES, ids=lambda a: a.name)
def test_boot_argv(arch: Arch, accel: str, variant: str) -> None:
    flags, environ = VARIANTS[variant]
    settings = effective(DEFAULTS, {**flags, "arch": arch.name, "accel": "auto"}, workspace=WORKSPACE)
    # KVM only ever runs natively; TCG is shown from an x86_64 host (cross for the others).
    host = vm.Host(arch=arch if accel == "kvm" else X86_64, memory_mib=16384, vng="vng", environ=environ)
    boot = vm.Boot(
        settings=settings,
        kernel=Path("/boot/vmlinuz-6.12.0"),
        accel=accel,
        run_dir=RUN_DIR,
        force_9p=variant == "options",  # a host whose virtiofsd cannot start (hostprobe.py)
        native_init=variant == "defaults",  # an arm64 host with the wheel's x86-64 virtme-ng-init
        # A foreign guest boots its own root (guestroot.py), named by its key.
        root=None if host.arch == arch else Path(f"/cache/vngtasks/guest-roots/{arch.name}-0123456789abcdef"),
    )
    check_golden(f"boot-{arch.name}-{accel}-{variant}.argv", vm.vng_argv(boot, host))


@pytest.mark.parametrize("arch", arches.ARCHES, ids=lambda a: a.name)
def test_build_argv(arch: Arch) -> None:
    argv = render.argv(
        "vng-build.argv.j2",
        vng="vng",
        arch=arch,
        host_arch=X86_64,
        jobs=16,
        name="mainline",
        sha12="adc218676eef",
        build_timestamp="@1732492800",
        cc="clang" if arch.name == "arm64" else "",
        hostcc="/cache/work/mainline/tools/hostcc" if arch.name == "x86_64" else "",
        llvm="-14" if arch.name == "arm64" else "",
    )
    check_golden(f"build-{arch.name}.argv", argv)


CONFIG_CASES = [
    ("x86_64", "vng"), ("x86_64", "tiny"), ("x86_64", "file"), ("arm64", "vng"), ("arm64", "tiny"), ("arm64", "file"),
]  # fmt: skip


@pytest.mark.parametrize(("arch", "base"), CONFIG_CASES, ids=[f"{a}-{b}" for a, b in CONFIG_CASES])
def test_config_steps(arch: str, base: str, tmp_path: Path) -> None:
    """How each kconfig base makes .config (one command per line), natively and cross from x86_64."""
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "kernel.config").write_text("CONFIG_IKCONFIG=y\n")
    (tmp_path / "full.config").write_text("CONFIG_64BIT=y\n")
    flags = {"arch": arch, "kconfig": "ci/kernel.config", "kconfig_base": "full.config" if base == "file" else base}
    settings = effective(DEFAULTS, flags, workspace=tmp_path)
    plan = buildsteps.Plan(settings, "a" * 40, "/w/linux", X86_64, 16, "/w/tools")
    steps = kernelmake.config_steps(plan, kernelmake.make_variables(kernelmake.vng_argv(plan, "vng")))
    check_golden(f"kconfig-{arch}-{base}.steps", [shlex.join(step) for step in steps])


@pytest.mark.parametrize("arch", [a for a in arches.ARCHES if a.tiny_kconfig], ids=lambda a: a.name)
def test_tiny_fragment(arch: Arch, tmp_path: Path) -> None:
    settings = effective(DEFAULTS, {"arch": arch.name, "kconfig_base": "tiny"}, workspace=tmp_path)
    (name, text), *_ = kconfig.fragments(settings)
    assert name == "tiny.config"
    check_golden(f"kconfig-tiny-{arch.name}.config", text.splitlines())


@pytest.mark.parametrize("arch", [a for a in arches.ARCHES if a.probe_code], ids=lambda a: a.name)
def test_kvm_probe_argv(arch: Arch) -> None:
    check_golden(f"kvm-probe-{arch.name}.argv", render.argv("kvm-probe.argv.j2", arch=arch, firmware="/tmp/probe.bin"))


def test_guest_script() -> None:
    script = render.text("guest.sh.j2", run_dir=RUN_DIR, workdir=Path("/work/my project"))
    check_golden("guest.sh", script.splitlines())


def test_default_memory_is_capped_under_tcg_only() -> None:
    settings = effective(DEFAULTS, {"extra_rwdirs": ""}, workspace=WORKSPACE)
    assert vm.memory_mib(settings, "kvm", 24000) == 21600
    assert vm.memory_mib(settings, "tcg", 24000) == settings.arch.tcg_memory_cap_mib
    assert vm.memory_mib(settings, "tcg", 2000) == 1800


def test_cpu_host_is_dropped_without_kvm() -> None:
    settings = effective(DEFAULTS, {"qemu_opts": "-cpu host,pmu=off -smp 2"}, workspace=WORKSPACE)
    console = RUN_DIR / "console.log"
    assert "host,pmu=off" in vm.qemu_options(settings, "kvm", console)
    assert vm.qemu_options(settings, "tcg", console)[:2] == ["-cpu", settings.arch.tcg_cpu]
    assert vm.qemu_options(settings, "tcg", console)[-2:] == ["-smp", "2"]


@pytest.mark.parametrize("arch", arches.ARCHES, ids=lambda a: a.name)
def test_console_log_is_a_virtconsole_of_its_own(arch: Arch) -> None:
    settings = effective(DEFAULTS, {"arch": arch.name}, workspace=WORKSPACE)
    opts = vm.qemu_options(settings, "tcg", RUN_DIR / "console.log")
    assert f"file,id=vngtasks-log,path={RUN_DIR}/console.log" in opts
    with pytest.raises(InputError, match=r"^log-dir: '/logs/a,b': vng pastes this path"):  # "," is QEMU's separator
        effective(DEFAULTS, {"arch": arch.name, "log_dir": "/logs/a,b"}, workspace=WORKSPACE)
    assert "virtconsole,chardev=vngtasks-log,bus=vngtasks-log-bus.0" in opts


def test_a_line_break_never_becomes_a_second_argument() -> None:
    with pytest.raises(ValueError, match="line break"):
        render.argv("qemu.argv.j2", arch=X86_64, accel="tcg", user_opts=["-name", "x\n--exec=reboot"], console_log="")


def test_argv_keeps_shell_characters_literal() -> None:
    opts = ["-device", "virtio-rng-pci,id=$(reboot);`id`"]
    assert render.argv("qemu.argv.j2", arch=X86_64, accel="tcg", user_opts=opts, console_log="")[-2:] == opts


def test_templates_ship_in_the_wheel(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, root],
        check=True,
    )
    (wheel,) = tmp_path.glob("vngtasks-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    shipped = sorted(p.name for p in (tmp_path / "site" / "vngtasks" / "templates").iterdir())
    assert shipped == sorted(p.name for p in (root / "templates").iterdir())
    # Installed (no checkout around it), the package still renders.
    code = (
        "from vngtasks import arches, render;"
        "print(render.argv('qemu.argv.j2', arch=arches.ARCHES[0], accel='kvm', user_opts=[], console_log=''))"
    )
    site = {"PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=site, capture_output=True, text=True)
    assert done.stdout.strip() == "['-cpu', 'host']", done.stderr


@pytest.mark.parametrize(
    ("workspace", "shared"),
    [("/work/project", False), ("/var/tmp/ci/project", True), ("/run/user/1000/w", True), ("/var/tmpx/w", False)],
)
def test_a_read_only_workspace_the_guests_init_covers_is_shared_read_only(workspace: str, shared: bool) -> None:
    """virtme-ng's init mounts a tmpfs of its own on /var/tmp, /run, ...: a read-only workspace there would be
    an empty directory in the guest, so it is shared read-only; elsewhere the host's root shows it."""
    settings = effective(DEFAULTS, {"workspace_rw": "false", "extra_rwdirs": ""}, workspace=Path(workspace))
    boot = vm.Boot(settings, Path("/boot/vmlinuz-6.12.0"), "tcg", RUN_DIR, False, True, None)
    host = vm.Host(arch=arches.host(), memory_mib=16384, vng="vng", environ={})
    assert (f"--rodir={workspace}={workspace}" in vm.vng_argv(boot, host)) is shared
