"""Every setting, declared once in `SETTINGS`; the typed `Settings` a task runs with.

Raw values arrive as strings (task flags, `INVOKE_VNG_*` env, the action's inputs) or as YAML
scalars (`invoke.yaml`, `vngtasks.yaml`). `effective()` merges them, weakest first, and parses each
with its row's parser into a frozen `Settings`; any bad value raises `InputError` naming the input.
The table also gives invoke its defaults, each task its flags and help, the README its settings
table and the action its inputs (vngtasks/reference.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import arches, distcc, remotecache, sanitizers, validate
from .arches import Arch
from .validate import Given, InputError, Parser

TORVALDS_URL = "https://git.kernel.org/pub/scm/linux/kernel/git/torvalds/linux.git"

# The tasks that take settings as flags (every task reads all of them from config and env).
DEPS, RESOLVE, BUILD, BOOT, BISECT, MATRIX, CACHE = "deps", "resolve", "build", "boot", "bisect", "matrix", "cache"
_NAMES_A_KERNEL = (RESOLVE, BUILD, BOOT, BISECT, MATRIX)
_NAMES_A_REF = (RESOLVE, BUILD, BOOT, MATRIX)  # bisect names two, with --good and --bad; matrix a list
_BUILDS = (BUILD, BOOT, BISECT, MATRIX)
_BOOTS = (BOOT, BISECT, MATRIX)


@dataclass(frozen=True)
class Setting:
    """One setting: `name` is its invoke config key (`vng.NAME`), its INVOKE_VNG_NAME and its flag."""

    name: str
    default: str  # as the action's inputs are, a string: what the user would type
    tasks: tuple[str, ...]  # the tasks that take it as a flag
    parse: Parser
    help: str  # one line: the flag's help, the README's meaning, the action input's description
    shown: str = ""  # the README's default, when `default` is empty or says little
    field: str = ""  # its `Settings` field, when that is not `name`
    action_input: str = ""  # its action input, when that is not `name` with dashes
    action_required: bool = False  # the action requires it (no default there)

    @property
    def dashed(self) -> str:
        return self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("name", "default", _NAMES_A_KERNEL, validate.NAME,
            "build name: part of cache keys and of `uname -r`; letters, digits, `._-`, no leading `.` or `-`",
            action_required=True),
    Setting("kernel_url", TORVALDS_URL, _NAMES_A_KERNEL, validate.kernel_url,
            "kernel git URL, or a path (relative to the workspace)", shown="torvalds' linux.git"),
    Setting("tag", "", _NAMES_A_REF, validate.git_ref,
            "kernel git tag, branch or 40-hex commit to build and boot", action_input="kernel-tag"),
    Setting("version", "v2", _NAMES_A_KERNEL, validate.VERSION, "cache version: bump it to force a rebuild"),
    Setting("kconfig", "", _BUILDS, validate.existing_file,
            "kconfig fragment file, relative to the workspace; must exist"),
    Setting("kconfig_base", "vng", _NAMES_A_KERNEL, validate.kconfig_base,
            "the .config the fragment goes on: vng (its defconfig-based one), tiny, or a .config file"),
    Setting("kernel", "", (BOOT,), validate.kernel,
            "prebuilt kernel image or build directory to boot "
            "(default: the host's distro kernel, or Debian's kernel of a foreign arch)"),
    Setting("arch", "", (DEPS, *_NAMES_A_KERNEL), validate.target_arch,
            "target architecture: x86_64, arm64, riscv64, s390x, ppc64le or an alias (amd64, aarch64, X64, ...)",
            shown="the host's"),
    Setting("accel", "auto", _BOOTS, validate.ACCEL,
            "auto, kvm or tcg (auto falls back to tcg when KVM does not work)"),
    Setting("cpus", "", _BOOTS, validate.cpus, "guest CPUs, at least 1",
            shown="all host CPUs (matrix: a boot's share)"),
    Setting("memory", "", _BOOTS, validate.memory_mib, "guest memory, e.g. 512M or 4G; no suffix means MiB",
            shown="90% of host RAM, or of a matrix boot's share (at most 4G under TCG)", field="memory_mib"),
    Setting("network", "", _BOOTS, validate.NETWORK, "guest network: user, loop, bridge or bridge=NAME",
            shown="none"),
    Setting("verbose", "true", _BOOTS, validate.boolean, "stream the guest console"),
    Setting("append", "mitigations=off", _BOOTS, validate.kernel_append, "extra kernel command line"),
    Setting("qemu_opts", "", _BOOTS, validate.qemu_opts,
            "extra QEMU options, split like a shell would (never run by one); "
            "each of letters, digits and `. _ / + @ % : ~ - = ,` only"),
    Setting("run_timeout", "0", _BOOTS, validate.count(0),
            "seconds the workload may run, 0 = no limit (exit 124 on expiry)"),
    Setting("boot_timeout", "300", _BOOTS, validate.count(0),
            "seconds the guest may take to start the workload, 0 = no limit"),
    Setting("udev", "false", _BOOTS, validate.boolean,
            "run udev's coldplug in the guest before the workload (vng's init does where the host has udev; "
            "under TCG it costs seconds)"),
    Setting("workspace_rw", "true", _BOOTS, validate.boolean, "the current directory is writable from the guest"),
    Setting("extra_rwdirs", "~/.cargo", _BOOTS, validate.rwdirs,
            "more host directories the guest may write, space-separated, ~ expanded"),
    Setting("cache_dir", "", (DEPS, *_NAMES_A_KERNEL, CACHE), validate.cache_dir,
            "kernel cache and per-run files", shown="$XDG_CACHE_HOME/vngtasks"),
    Setting("packages", "", (DEPS,), validate.packages, "extra Debian packages to install, space-separated"),
    Setting("install_recommends", "false", (DEPS,), validate.boolean, "let apt install recommended packages too"),
    Setting("deps_timeout", "90", (DEPS,), validate.count(0),
            "seconds an install attempt may spend on apt-get update, wait for the dpkg lock or on a stalled "
            "download (dpkg itself is never stopped); 0 = no limit"),
    Setting("deps_retries", "3", (DEPS,), validate.count(1), "dependency install attempts"),
    Setting("apt_cache", "false", (DEPS,), validate.boolean,
            "keep downloaded .deb files under cache-dir/apt/archives (the action caches them)"),
    Setting("cc", "", (DEPS, *_BUILDS), validate.CC, "C compiler for the kernel build, e.g. clang"),
    Setting("llvm", "", (DEPS, *_BUILDS), validate.LLVM,
            "LLVM toolchain for the kernel build: 1 or a suffix such as -14"),
    Setting("kernel_compile_cache", "true", _BUILDS, validate.boolean, "build through ccache"),
    Setting("ccache_max_size", "5G", _BUILDS, validate.CCACHE_SIZE,
            "the most the building machine's ccache may hold, e.g. 500M, 20G; 0 = no limit (ccache's max_size)"),
    Setting("ccache_remote", "", _BUILDS, remotecache.parse,
            "a shared ccache every build reads and fills (ccache's remote_storage): http://[USER:PASSWORD@]HOST[:PORT]"
            "/PATH (a server taking GET and PUT) or redis://[[USER:]PASSWORD@]HOST[:PORT][/DB], ccache's attributes "
            "after a pipe; may hold a secret (never printed)", shown="none"),
    Setting("ccache_reshare", "false", _BUILDS, validate.boolean,
            "also write local ccache hits to ccache-remote, so a warm machine fills it (ccache's reshare)"),
    Setting("distcc_hosts", "", _BUILDS, distcc.parse,
            "helpers that compile the build's ccache misses with distcc: [USER]@HOST[/SLOTS][,lzo] over SSH (the "
            "building machine's ssh, strict), localhost[/SLOTS]; space-separated; make's -j is their slots",
            shown="none"),
    Setting("distcc_tcp", "false", _BUILDS, validate.boolean,
            "also take distcc-hosts entries reached over plain TCP (HOST[:PORT][/SLOTS]): anyone who reaches a "
            "distccd there can run compilers on it"),
    Setting("debug", "", _NAMES_A_KERNEL, validate.debug,
            "sanitizer and debug options built in: kasan, ubsan, kcsan, lockdep, kmemleak, lkdtm (comma-separated; "
            "part of the cache key)"),
    Setting("vmlinux_h", "true", _BUILDS, validate.boolean,
            "build with BTF and write vmlinux.h into the cache entry"),
    Setting("build_host", "", _BUILDS, validate.build_hosts,
            "the host to build on over SSH: an alias of ~/.ssh/config, or [user@]host[:port]; several, "
            "space-separated: `invoke matrix` builds a cell on each at once, other tasks build on the first"),
    Setting("build_host_accept_new", "false", _BUILDS, validate.boolean,
            "trust a build host never seen before and record its key in ~/.ssh/known_hosts"),
    Setting("build_host_proxy_command", "false", _BUILDS, validate.boolean,
            "let a ProxyCommand of ~/.ssh/config reach the build host (it runs a shell command of the config's)"),
    Setting("build_host_key", "", _BUILDS, validate.private_key,
            "a private key's text for the build hosts and their jump hosts, besides ~/.ssh's: for CI, from a "
            "secret (never printed)", shown="none"),
    Setting("build_host_known_hosts", "", _BUILDS, validate.known_hosts_lines,
            "known_hosts lines for the build hosts and their jump hosts, besides ~/.ssh/known_hosts: for CI"),
    Setting("reuse_resolved", "false", _NAMES_A_REF, validate.boolean,
            "outside GitHub Actions, reuse the commit a resolve recorded for the same tag and URL"),
    Setting("run", "", (), validate.any_text,
            "the workload, a bash script run with `bash -eo pipefail`, when none is given after `--`",
            action_required=True),
    Setting("log_dir", "", _BOOTS, validate.log_dir,
            "where vng-console.log, vng-dmesg.log, vng-run.json, crashes.json and a vmcore go (created if missing)",
            shown="the workspace"),
    Setting("vmcore", "off", _BOOTS, validate.VMCORE,
            "on-failure: on a panic, a boot timeout or a run timeout, QEMU dumps the guest's memory to log-dir/vmcore "
            "(ELF, the size of the guest's memory) with the kernel's vmlinux beside it, for `drgn -c vmcore -s "
            "vmlinux`; x86_64 and arm64"),
    Setting("splat_check", "true", _BOOTS, validate.boolean,
            "kernel warnings, BUGs, oopses, stalls in the guest fail a passing workload (exit 123)"),
    Setting("splat_allow", "", _BOOTS, validate.regexes,
            "regexes (Python re, searched anywhere in the line) of splat lines to ignore, one per line; a crash "
            "report whose first line one matches is left out"),
    Setting("results", "", _BOOTS, validate.results,
            "test results to read after the run: ktap (the workload's stdout), kunit (KUnit's suites in the "
            "kernel's boot log) or a KTAP/TAP file the workload writes, relative to the workspace; writes "
            "results.xml and results.json to log-dir, and a new failing test fails the run (exit 1)", shown="none"),
    Setting("known_failures", "", _BOOTS, validate.known_failures,
            "a file of test ids that may fail (globs; `#` comments; `[regex]` after one: only on kernels whose "
            "release it matches), relative to the workspace", shown="none"),
    Setting("results_baseline", "", _BOOTS, validate.results_baseline,
            "an earlier run's results.json, relative to the workspace: the tests that failed there may fail",
            shown="none"),
)  # fmt: skip

BY_NAME: dict[str, Setting] = {setting.name: setting for setting in SETTINGS}
# invoke's defaults (`ns.configure({"vng": DEFAULTS})`) and each flag's help.
DEFAULTS: dict[str, str] = {setting.name: setting.default for setting in SETTINGS}
HELP: dict[str, str] = {setting.name: setting.help for setting in SETTINGS}
# Settings whose items may hold spaces: one item per line (a YAML list works too).
_LINE_LISTS = frozenset(["splat_allow"])


def taken_by(task: str) -> list[str]:
    """The settings `task` takes as flags, in the table's order."""
    return [setting.name for setting in SETTINGS if task in setting.tasks]


@dataclass(frozen=True)
class Settings:
    """The parsed settings: one field per row of SETTINGS (`field`, else its name), and the workspace."""

    name: str
    kernel_url: str
    tag: str
    version: str
    kconfig: Path | None
    kconfig_base: str | Path  # "vng", "tiny", or a full .config file
    kernel: Path | None
    arch: Arch
    accel: str
    cpus: int | None  # None: the default, counted at boot (all host CPUs, or a matrix boot's share)
    memory_mib: int | None  # None: the default, sized when the accelerator is known
    network: str
    verbose: bool
    append: str
    qemu_opts: tuple[str, ...]
    run_timeout: int
    boot_timeout: int
    udev: bool
    workspace_rw: bool
    extra_rwdirs: tuple[Path, ...]
    cache_dir: Path
    packages: tuple[str, ...]
    install_recommends: bool
    deps_timeout: int
    deps_retries: int
    apt_cache: bool
    cc: str
    llvm: str
    kernel_compile_cache: bool
    ccache_max_size: str
    ccache_remote: str  # a URL that may hold a password: shown only through remotecache.shown
    ccache_reshare: bool
    distcc_hosts: tuple[distcc.Helper, ...]
    distcc_tcp: bool
    debug: tuple[str, ...]  # names of sanitizers.OPTIONS, in its order
    vmlinux_h: bool
    build_host: tuple[str, ...]
    build_host_accept_new: bool
    build_host_proxy_command: bool
    build_host_key: str
    build_host_known_hosts: str
    reuse_resolved: bool
    run: str
    log_dir: Path
    vmcore: str  # "off" or "on-failure"
    splat_check: bool
    splat_allow: tuple[str, ...]  # regexes, each checked by re.compile
    results: str  # "", "ktap", "kunit" or a relative path under the workspace
    known_failures: Path | None
    results_baseline: Path | None
    workspace: Path


def effective(
    config: Mapping[str, object],
    flags: Mapping[str, object | None],
    *,
    workspace: Path | None = None,
) -> Settings:
    """Merge config (already layered by invoke) with task flags and parse all of it."""
    unknown = sorted(set(flags) - set(BY_NAME))
    if unknown:
        raise InputError(unknown[0], "not a known setting")
    unknown = sorted(set(config) - set(BY_NAME))
    if unknown:  # a misspelt key in invoke.yaml must not be a silent no-op
        raise InputError(unknown[0], "not a known setting (in the `vng` section of an invoke.yaml)")
    raw = {key: _text(key, config.get(key, default)) for key, default in DEFAULTS.items()}
    raw.update({key: _text(key, value) for key, value in flags.items() if value is not None})
    workspace = (workspace or Path.cwd()).resolve()
    given = Given(validate.plain_path("workspace", workspace), validate.arch("arch", raw["arch"]))
    values = {row.field or row.name: row.parse(row.name, raw[row.name], given) for row in SETTINGS}
    settings = Settings(**values, workspace=given.workspace)  # type: ignore[arg-type]
    _check_together(settings)
    return settings


def _check_together(s: Settings) -> None:
    """What no single value shows: a pair that cannot work."""
    if s.kconfig_base == "tiny" and not s.arch.tiny_kconfig:
        raise InputError("kconfig_base", f"tiny is not available for {s.arch.name} yet: use vng or a .config file")
    if s.accel == "kvm" and s.arch != arches.host():
        raise InputError("accel", f"kvm cannot run {s.arch.name} guests on a {arches.host().name} host: use tcg")
    for name in s.debug:
        option = sanitizers.BY_NAME[name]
        if s.arch.name not in option.arches:
            raise InputError("debug", f"{name} is not offered on {s.arch.name} (only {', '.join(option.arches)})")
        if clash := next((other for other in option.excludes if other in s.debug), None):
            raise InputError("debug", f"{name} and {clash} exclude each other: choose one")
    if s.vmcore != "off" and not s.arch.vmcoreinfo:
        offered = ", ".join(arch.name for arch in arches.ARCHES if arch.vmcoreinfo)
        raise InputError("vmcore", f"not offered on {s.arch.name} (only {offered}: QEMU's vmcoreinfo device)")
    if s.ccache_remote and not s.kernel_compile_cache:
        raise InputError("ccache_remote", "needs kernel-compile-cache true: the remote is ccache's")
    if s.distcc_hosts and not s.kernel_compile_cache:
        raise InputError("distcc_hosts", "needs kernel-compile-cache true: distcc compiles ccache's misses")
    tcp = next((helper.spec for helper in s.distcc_hosts if helper.kind == "tcp"), "")
    if tcp and not s.distcc_tcp:
        raise InputError("distcc_hosts", f"{tcp} is reached over plain TCP, where anyone who reaches its distccd runs "
                                         "compilers: use [USER]@HOST for SSH, or set distcc-tcp true")  # fmt: skip
    if s.ccache_reshare and not s.ccache_remote:
        raise InputError("ccache_reshare", "needs ccache-remote: there is no remote to fill")
    for key in ("known_failures", "results_baseline"):
        if getattr(s, key) and not s.results:
            raise InputError(key, "needs `results`: there are no test results to compare")


def _text(key: str, value: object) -> str:
    """A raw value as text; none holds a NUL (no path, argument or environment value can)."""
    if isinstance(value, bool):  # YAML true/false in invoke.yaml
        return "true" if value else "false"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ("\n" if key in _LINE_LISTS else " ").join(value)
    if not isinstance(value, int | str):
        raise InputError(key, f"expected a string, got {type(value).__name__}")
    if "\0" in str(value):
        raise InputError(key, "holds a NUL character")
    return str(value).strip()
