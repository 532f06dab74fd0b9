"""The build's steps on small real git repositories, and its pure helpers (fast)."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from invoke import Context, Result

from vngtasks import arches, build, buildsteps, cache, kconfig, kernelmake, log, provide, vm
from vngtasks.errors import Failure
from vngtasks.resolve import Resolved
from vngtasks.settings import DEFAULTS, effective


def git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    done = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env)
    return done.stdout.strip()


@pytest.fixture
def remote(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    repo = tmp_path / "remote"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "master")
    commits = {}
    for name in ("first", "second", "third"):
        (repo / "file").write_text(name)
        git(repo, "add", "file")
        git(repo, "commit", "-q", "-m", name)
        commits[name] = git(repo, "rev-parse", "HEAD")
        if name == "first":
            git(repo, "tag", "-a", "v1", "-m", "v1")
    return repo, commits


def test_fetch_checks_out_exactly_the_resolved_commit(tmp_path: Path, remote) -> None:
    repo, commits = remote
    tree = tmp_path / "tree"
    buildsteps.fetch(Context(), f"file://{repo}", "v1", commits["first"], str(tree))
    assert git(tree, "rev-parse", "HEAD") == commits["first"]
    assert (tree / "file").read_text() == "first"
    assert git(tree, "rev-list", "--count", "HEAD") == "1"  # shallow


def test_fetch_of_a_moved_tag_fetches_the_resolved_sha(tmp_path: Path, remote, capsys) -> None:
    repo, commits = remote
    git(repo, "tag", "-f", "-a", "v1", "-m", "moved", commits["second"])
    tree = tmp_path / "tree"
    buildsteps.fetch(Context(), f"file://{repo}", "v1", commits["first"], str(tree))
    assert git(tree, "rev-parse", "HEAD") == commits["first"]
    assert "now points at" in capsys.readouterr().err


def test_fetch_fails_rather_than_build_another_commit(tmp_path: Path, remote, monkeypatch) -> None:
    repo, commits = remote
    git(repo, "tag", "-f", "-a", "v1", "-m", "moved", commits["second"])
    # Protocol v0 servers refuse unadvertised objects: the resolved commit cannot be had.
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", "protocol.version")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", "0")
    tree = tmp_path / "tree"
    with pytest.raises(Failure, match=r"^tag: cannot fetch commit"):
        buildsteps.fetch(Context(), f"file://{repo}", "v1", commits["first"], str(tree))


def test_fetch_reuses_a_work_tree(tmp_path: Path, remote) -> None:
    repo, commits = remote
    tree = tmp_path / "tree"
    buildsteps.fetch(Context(), f"file://{repo}", "v1", commits["first"], str(tree))
    (tree / "build-output.o").write_text("kept")  # an incremental build's objects survive
    buildsteps.fetch(Context(), f"file://{repo}", "master", commits["third"], str(tree))
    assert (tree / "file").read_text() == "third" and (tree / "build-output.o").exists()


def plan(**flags: str) -> buildsteps.Plan:
    settings = effective(DEFAULTS, {"tag": "v6.12", **flags}, workspace=Path("/work/project"))
    return buildsteps.Plan(settings, "a" * 40, "/w/linux", arches.lookup("x86_64"), 8, "/w/tools")


@pytest.mark.parametrize(
    ("flags", "compiler"),
    [({}, "gcc"), ({"cc": "clang"}, "clang"), ({"llvm": "1"}, "clang"), ({"llvm": "-14"}, "clang-14")],
)
def test_compiler_behind_the_ccache_wrapper(flags: dict[str, str], compiler: str) -> None:
    assert plan(**flags).compiler == compiler


def test_cross_builds_use_the_cross_gcc() -> None:
    assert plan(arch="arm64").compiler == "aarch64-linux-gnu-gcc"


def make_steps(p: buildsteps.Plan) -> list[list[str]]:
    """Every command of a build that runs make: the .config steps, then vng's build line."""
    argv = kernelmake.vng_argv(p, "vng")
    steps = kernelmake.config_steps(p, kernelmake.make_variables(argv))
    return [step for step in steps if step[0] in ("make", "virtme-configkernel")] + [argv]


def cross_plan(arch: arches.Arch, base: str, tmp_path: Path, **flags: str) -> buildsteps.Plan:
    (tmp_path / "full.config").write_text("CONFIG_64BIT=y\n")
    flags = {"arch": arch.name, "kconfig_base": "full.config" if base == "file" else base, **flags}
    settings = effective(DEFAULTS, flags, workspace=tmp_path)
    return buildsteps.Plan(settings, "a" * 40, "/w/linux", arches.lookup("x86_64"), 8, "/w/tools")


CROSS = [
    (arch, base)
    for arch in arches.ARCHES
    if arch.name != "x86_64"
    for base in ("vng", "tiny", "file")
    if base != "tiny" or arch.tiny_kconfig
]


@pytest.mark.parametrize(("arch", "base"), CROSS, ids=[f"{a.name}-{b}" for a, b in CROSS])
def test_every_make_step_of_a_cross_build_names_the_target(arch: arches.Arch, base: str, tmp_path: Path) -> None:
    """tinyconfig, kvm_guest.config, olddefconfig (after the BTF fragment), configkernel and vng's build (with
    the modules): each gets the row's ARCH and CROSS_COMPILE, so none configures the tree for the host."""
    steps = make_steps(cross_plan(arch, base, tmp_path))
    assert len(steps) == {"vng": 3, "tiny": 4, "file": 2}[base]
    for step in steps:
        if step[0] == "make":
            assert step[1:3] == [f"ARCH={arch.kernel_arch}", f"CROSS_COMPILE={arch.cross_compile}"], step
        elif step[0] == "virtme-configkernel":  # it makes ARCH= of --arch itself
            assert step[2:4] == [f"--arch={arch.uname_m}", f"CROSS_COMPILE={arch.cross_compile}"], step
        else:
            assert step[3:5] == [f"--arch={arch.vng_name}", f"--cross-compile={arch.cross_compile}"], step


@pytest.mark.parametrize("llvm", ["1", "-14"])
@pytest.mark.parametrize("base", ["vng", "tiny"])
def test_a_cross_llvm_build_gives_make_arch_and_llvm_and_no_cross_prefix(llvm: str, base: str, tmp_path: Path) -> None:
    """With LLVM=1 clang and the LLVM tools target ARCH themselves (the kernel's Documentation/kbuild/llvm.rst):
    no CROSS_COMPILE prefix, and an empty one after vng's own (make takes the later value)."""
    arm64 = arches.lookup("arm64")
    for step in make_steps(cross_plan(arm64, base, tmp_path, llvm=llvm)):
        assert f"LLVM={llvm}" in step and "CC=/w/tools/cc" in step, step
        assert [arg for arg in step if "CROSS_COMPILE=" in arg or arg.startswith("--cross")] == ["CROSS_COMPILE="]
        assert f"ARCH={arm64.kernel_arch}" in step or f"--arch={arm64.uname_m}" in step or "--arch=arm64" in step
    assert cross_plan(arm64, base, tmp_path, llvm=llvm).compiler == "clang" + ("" if llvm == "1" else llvm)


@pytest.mark.parametrize("base", ["vng", "tiny", "file"])
def test_a_native_build_names_no_arch(base: str, tmp_path: Path) -> None:
    (tmp_path / "full.config").write_text("CONFIG_64BIT=y\n")
    flags = {"arch": "x86_64", "kconfig_base": "full.config" if base == "file" else base}
    settings = effective(DEFAULTS, flags, workspace=tmp_path)
    p = buildsteps.Plan(settings, "a" * 40, "/w/linux", arches.lookup("x86_64"), 8, "/w/tools")
    for step in make_steps(p):
        assert not [arg for arg in step if arg.startswith(("ARCH=", "CROSS_COMPILE=", "--arch", "--cross"))], step


def test_make_variables_are_what_vng_passes_on() -> None:
    argv = kernelmake.vng_argv(plan(llvm="1"), "vng")
    assert kernelmake.make_variables(argv) == [
        "LOCALVERSION=__default__aaaaaaaaaaaa",
        "KBUILD_BUILD_TIMESTAMP=@0",
        "KBUILD_BUILD_USER=vngtasks",
        "KBUILD_BUILD_HOST=vngtasks",
        "CC=/w/tools/cc",
        "HOSTCC=/w/tools/hostcc",
        "LLVM=1",
    ]


def test_ccache_max_size_reaches_the_build_s_ccache() -> None:
    assert buildsteps.build_env(plan(), "/home/u")["CCACHE_MAXSIZE"] == "5G"  # the seed's cap
    assert buildsteps.build_env(plan(ccache_max_size="20G"), "/home/u")["CCACHE_MAXSIZE"] == "20G"


def test_without_ccache_no_wrapper_and_no_ccache_env() -> None:
    p = plan(kernel_compile_cache="false")
    assert not [a for a in kernelmake.vng_argv(p, "vng") if a.startswith("CC=")]
    assert not [k for k in buildsteps.build_env(p, "/home/u") if k.startswith("CCACHE")]


def test_progress_counts_objects() -> None:
    out = io.StringIO()
    progress = kernelmake.BuildProgress(out, every=2)
    progress.write("  CC      a.o\n  CC [M]  b.o\n  LD      vmlinux\n  C")
    progress.write("C      c.o\n")
    assert out.getvalue().count("objects built") == 1 and progress.objects == 3


def test_progress_of_one_of_builds_at_once_is_whole_labeled_lines() -> None:
    """Made in a log.labeled block (a matrix's build thread), its lines are whole and labeled, though invoke writes
    them from another thread and in pieces."""
    out = io.StringIO()
    with log.labeled("01-v6.12-x86_64-tiny"):
        progress = kernelmake.BuildProgress(out, every=2)
    progress.write("  CC      a.o\n  C")
    progress.write("C      b.o\n")
    label = "[01-v6.12-x86_64-tiny] "
    assert out.getvalue().splitlines() == [f"{label}  CC      a.o", f"{label}  CC      b.o",
                                           f"{label}vngtasks: build: 2 objects built"]  # fmt: skip


def test_a_build_heading_is_a_group_in_actions_but_a_plain_labeled_line_for_one_of_builds_at_once(
    monkeypatch, capsys
) -> None:
    """A group would fold the lines of the other builds that run at once into it."""
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    with buildsteps.group("build ci"):
        pass
    with log.labeled("02-v6.12-arm64-tiny"), buildsteps.group("build ci"):
        pass
    assert capsys.readouterr().out.splitlines() == ["::group::build ci", "::endgroup::",
                                                    "[02-v6.12-arm64-tiny] vngtasks: build ci"]  # fmt: skip


def test_reproducer_is_a_command_line() -> None:
    line = build.reproducer(plan(cc="clang").settings, "b" * 40)
    assert line.startswith("invoke build --kernel-url ") and f"--tag {'b' * 40}" in line and "--cc clang" in line
    assert "--debug" not in line and "--debug kasan,lkdtm" in build.reproducer(plan(debug="lkdtm,kasan").settings, "b")


def test_reproducer_never_holds_the_ccache_remote_s_secret() -> None:
    line = build.reproducer(plan(ccache_remote="redis://s3cret@cache.example").settings, "b" * 40)
    assert "s3cret" not in line and "ccache" not in line


def test_fragment_lines_are_read_as_kconfig_does() -> None:
    fragment = 'CONFIG_A=y\n  # CONFIG_B is not set\nCONFIG_C="x y"\n# a comment\nCONFIG_D=m\nnot a line\n'
    assert kconfig.assignments(fragment) == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": '"x y"', "CONFIG_D": "m"}


def test_a_fragment_line_kconfig_dropped_is_named() -> None:
    config = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\nCONFIG_E=y\n'
    fragment = 'CONFIG_A=y\nCONFIG_B=y\nCONFIG_C="x y"\nCONFIG_TYPO=y\n# CONFIG_E is not set\n# CONFIG_F is not set\n'
    lost = kconfig.dropped(kconfig.assignments(fragment), config)
    assert lost == ["CONFIG_B=y", "CONFIG_TYPO=y", "# CONFIG_E is not set"]


def test_fragments_merge_in_order_tiny_btf_then_the_users(tmp_path: Path) -> None:
    (tmp_path / "k.config").write_text("CONFIG_IKCONFIG=y\n")
    settings = effective(DEFAULTS, {"kconfig_base": "tiny", "kconfig": "k.config"}, workspace=tmp_path)
    assert [name for name, _ in kconfig.fragments(settings)] == ["tiny.config", "btf.config", "kconfig.config"]
    settings = effective(DEFAULTS, {"vmlinux_h": "false"}, workspace=tmp_path)
    assert kconfig.fragments(settings) == []


def test_the_kconfig_base_is_part_of_the_cache_key(tmp_path: Path) -> None:
    (tmp_path / "a.config").write_text("CONFIG_64BIT=y\n")
    keys = {
        base: cache.key_for(effective(DEFAULTS, {"kconfig_base": base, "arch": "x86_64"}, workspace=tmp_path), "0" * 12)
        for base in ("vng", "tiny", "a.config")
    }
    assert keys["vng"] == "vng-kernel-default-x86_64-000000000000-v2"  # the seed's key, unchanged
    assert keys["tiny"] == "vng-kernel-default-x86_64-000000000000-v2+tiny"
    assert re.fullmatch(r"vng-kernel-default-x86_64-000000000000-v2\+config-[0-9a-f]{12}", keys["a.config"])
    (tmp_path / "a.config").write_text("CONFIG_64BIT=y\nCONFIG_SMP=y\n")
    changed = cache.key_for(effective(DEFAULTS, {"kconfig_base": "a.config"}, workspace=tmp_path), "0" * 12)
    assert changed != keys["a.config"]


def test_a_relative_kernel_url_is_fetched_too(cli, tmp_path: Path, workspace: Path, remote) -> None:
    """`../k` names a repository beside the workspace, for the fetch in the work tree as for resolve."""
    repo, _ = remote
    repo.rename(workspace.parent / "k")
    done = cli("build", "--tag", "v1", "--kernel-url", "../k", "--cache-dir", str(tmp_path / "c"))
    # Fetched and checked out; the build itself then fails: this repository holds no kernel.
    assert done.returncode == 1 and "kconfig: virtme-configkernel --defconfig failed" in done.stderr, done.stderr
    assert (tmp_path / "c" / "work" / "default-x86_64" / "linux" / "file").read_text() == "first"


def test_a_dry_run_prints_the_commands_and_touches_nothing(cli, tmp_path: Path, workspace: Path, remote) -> None:
    repo, commits = remote
    cache_dir = tmp_path / "c"
    args = ["--tag", "v1", "--kernel-url", f"file://{repo}", "--cache-dir", str(cache_dir), "--kconfig-base", "tiny"]
    before = sorted(tmp_path.rglob("*"))
    built = cli("build", *args, "--dry-run")
    booted = cli("boot", *args, "--dry-run", "--", "true")
    assert (built.returncode, booted.returncode) == (0, 0), built.stderr + booted.stderr
    assert sorted(tmp_path.rglob("*")) == before  # no cache, no work tree, no record in the workspace
    tree = f"{cache_dir}/work/default-x86_64/linux"
    lines = built.stdout.splitlines()
    assert lines[0].startswith("# cache miss vng-kernel-default-x86_64-") and "written first" in lines[0]
    assert lines[1:4] == [
        f"git init -q {tree}",
        f"git -C {tree} fetch --depth 1 --no-tags -- file://{repo} refs/tags/v1",
        f"git -C {tree} -c checkout.workers=0 checkout -q --force --detach {commits['first']}",
    ]
    assert lines[4].startswith(f"cd {tree} && make ") and lines[4].endswith(" tinyconfig")
    assert any(" --build " in line for line in lines) and "btf dump" in lines[-1]
    assert booted.stdout.splitlines()[:-1] == lines
    boot_line = booted.stdout.splitlines()[-1]
    assert boot_line.startswith(str(Path(sys.executable).parent / "vng")) and "--run=" in boot_line


FAKE_VNG = """\
#!/bin/sh
# Stands in for `vng --build` in a tree with no kernel: writes what a build of a kernel without modules makes.
mkdir -p "$(dirname "$VNGTASKS_TEST_IMAGE")" include/config
echo image > "$VNGTASKS_TEST_IMAGE"
echo 6.12.0 > include/config/kernel.release
echo "ffffffff81000000 T _text" > System.map
"""


def test_a_reused_work_tree_gives_no_earlier_build_s_outputs_to_the_entry(
    tmp_path: Path, remote, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local work tree is reused per name and arch: what an earlier build there made and this one does not
    (vmlinux.h of a build with BTF, the modules of a config with modules) must not land in this build's entry,
    as it never does on a build host, whose tree is per key."""
    repo, _ = remote
    (repo / "Makefile").write_text("olddefconfig:\n\t@true\n")
    git(repo, "add", "Makefile")
    git(repo, "commit", "-q", "-m", "a Makefile")
    git(repo, "tag", "-a", "v2", "-m", "v2")
    vng = tmp_path / "vng"
    vng.write_text(FAKE_VNG)
    vng.chmod(0o755)
    monkeypatch.setattr(vm, "vng_program", lambda: str(vng))
    monkeypatch.setenv("VNGTASKS_TEST_IMAGE", arches.host().boot_images[0])
    (tmp_path / "bin").mkdir()  # make's olddefconfig, as the Makefile above has it: no build toolchain needed
    (tmp_path / "bin" / "make").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "make").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "base.config").write_text("# CONFIG_MODULES is not set\n")
    flags = {"tag": "v2", "kernel_url": f"file://{repo}", "kconfig_base": "base.config", "vmlinux_h": "false"}
    settings = effective(DEFAULTS, {**flags, "cache_dir": str(tmp_path / "c")}, workspace=tmp_path)
    tree = tmp_path / "c" / "work" / f"default-{settings.arch.name}" / "linux"
    (tree / "drivers").mkdir(parents=True)  # what a build of another key (BTF, modules) left in the tree
    for name, text in {"vmlinux.h": "struct old;\n", "modules.order": "drivers/old.o\n", "drivers/old.ko": "x"}.items():
        (tree / name).write_text(text)
    sha = git(repo, "rev-parse", "v2^{commit}")
    entry = provide.ensure_kernel(Context(), settings, Resolved(sha, "refs/tags/v2", "remote"))
    kept = sorted(str(p.relative_to(entry.path)) for p in entry.path.rglob("*") if p.is_file())
    image = arches.host().boot_images[0]
    assert kept == sorted([".config", "System.map", "include/config/kernel.release", "metadata.json", image])


def test_a_reused_tree_keeps_its_modules_and_an_entry_takes_only_those_of_this_build(tmp_path: Path) -> None:
    """make relinks only what changed, so the modules stay in the tree before make; the entry then takes the
    `.ko` files this build's modules.order names (`.o` since Linux 6.2), never one of an earlier config, nor a
    path that climbs out of the tree."""
    tree = tmp_path / "linux"
    (tree / "drivers" / "a").mkdir(parents=True)
    for name in ("drivers/a/kept.ko", "drivers/a/old.ko", "vmlinux.h", "System.map"):
        (tree / name).write_text("x")
    subprocess.run(kernelmake.forget_outputs_command(str(tree)), shell=True, check=True)
    assert (tree / "drivers/a/kept.ko").exists() and (tree / "drivers/a/old.ko").exists()
    assert not (tree / "vmlinux.h").exists()
    (tree / "modules.order").write_text("drivers/a/kept.o\n../../etc/passwd.o\n/etc/shadow.ko\n")
    kept = buildsteps.kept_paths(Context(), str(tree), arches.host())
    assert kept == ["System.map", "drivers/a/kept.ko", "modules.order"]


def test_a_failed_config_step_names_make_s_first_error_not_its_last_line() -> None:
    stderr = (
        "scripts/Kconfig.include:58: Sorry, this assembler is not supported.\n"
        "make[2]: *** [scripts/kconfig/Makefile:85: olddefconfig] Error 1\n"
        "make[1]: *** [Makefile:737: olddefconfig] Error 2\n"
    )
    done = Result(stdout="", stderr=stderr, exited=2)
    assert kernelmake.first_error(done) == "scripts/Kconfig.include:58: Sorry, this assembler is not supported."
    assert kernelmake.first_error(Result(stdout="", stderr="make: *** No rule\n", exited=2)) == "make: *** No rule"
    assert kernelmake.first_error(Result(stdout="", stderr="", exited=2)) == "exit status 2"


def hostile_entry(tmp_path: Path, modules_order: str) -> tuple[Path, Path]:
    """An entry as a build host could send it, with a host file beside it that must not get in."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("host secret\n")
    entry = tmp_path / "cache" / "kernels" / ".tmp" / "entry"
    (entry / "drivers").mkdir(parents=True)
    (entry / "drivers" / "ok.ko").write_bytes(b"\x7fELF module")
    (entry / "modules.order").write_text(modules_order)
    return entry, outside


@pytest.mark.parametrize("line", ["{outside}/secret.o", "../../../../outside/escape/planted.o", "drivers/link.o"])
def test_a_hostile_modules_order_gets_no_host_file_into_the_entry_and_makes_nothing_outside(
    tmp_path: Path, line: str
) -> None:
    entry, outside = hostile_entry(tmp_path, "drivers/ok.o\n" + line.format(outside=tmp_path / "outside") + "\n")
    (entry / "drivers" / "link.ko").symlink_to(outside / "secret.txt")
    with pytest.raises(Failure, match=r"^modules\.order: "):
        build.prepare_modules(entry)
    copied = [p for p in entry.rglob("*") if p.is_file() and not p.is_symlink() and p.read_bytes() == b"host secret\n"]
    assert copied == [] and sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert not (tmp_path / "escape").exists()


@pytest.mark.integration  # depmod: kmod, a host package
def test_the_module_directory_holds_the_modules_of_modules_order_as_files(tmp_path: Path) -> None:
    module = next(Path("/lib/modules").glob("*/kernel/fs/binfmt_misc.ko"))  # the distro kernel's, with its map
    entry, _ = hostile_entry(tmp_path, "fs/binfmt_misc.o\n")
    (entry / "fs").mkdir()
    shutil.copy(module, entry / "fs" / "binfmt_misc.ko")
    shutil.copy(Path("/boot") / f"System.map-{module.parents[2].name}", entry / "System.map")
    build.prepare_modules(entry)
    moddir = entry / ".virtme_mods" / "lib" / "modules" / "0.0.0"
    placed = moddir / "kernel" / "fs" / "binfmt_misc.ko"
    assert (
        placed.is_file()
        and not placed.is_symlink()
        and placed.stat().st_ino == (entry / "fs/binfmt_misc.ko").stat().st_ino
    )
    assert "kernel/fs/binfmt_misc.ko:" in (moddir / "modules.dep").read_text()
    assert not [p for p in entry.rglob("*") if p.is_symlink()]
