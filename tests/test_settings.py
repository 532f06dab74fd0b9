from __future__ import annotations

from pathlib import Path

import pytest

from vngtasks import cache, kconfig, settings
from vngtasks.settings import DEFAULTS, effective
from vngtasks.validate import InputError


def make(workspace: Path, **flags: object) -> settings.Settings:
    return effective(DEFAULTS, flags, workspace=workspace)


def test_defaults_are_the_seeds(tmp_path: Path) -> None:
    s = make(tmp_path)
    assert (s.version, s.append, s.deps_timeout, s.deps_retries, s.run_timeout) == ("v2", "mitigations=off", 90, 3, 0)
    assert s.verbose and s.kernel_compile_cache and s.vmlinux_h and s.workspace_rw
    assert not s.install_recommends and not s.apt_cache
    assert s.extra_rwdirs == (Path("~/.cargo").expanduser(),)
    assert s.memory_mib is None and s.qemu_opts == () and s.accel == "auto"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"memory": "512M"}, ("memory_mib", 512)),
        ({"memory": "4g"}, ("memory_mib", 4096)),
        ({"memory": "2048"}, ("memory_mib", 2048)),
        ({"cpus": "3"}, ("cpus", 3)),
        ({"arch": "aarch64"}, ("arch", settings.arches.lookup("arm64"))),
        ({"verbose": "false"}, ("verbose", False)),
        ({"verbose": False}, ("verbose", False)),  # a YAML boolean in invoke.yaml
        ({"qemu_opts": "-device virtio-rng-pci,id=rng0"}, ("qemu_opts", ("-device", "virtio-rng-pci,id=rng0"))),
        ({"packages": " clang-14  lld-14 "}, ("packages", ("clang-14", "lld-14"))),
        ({"network": "bridge=br0"}, ("network", "bridge=br0")),
        ({"llvm": "-14"}, ("llvm", "-14")),
        ({"name": "sched_ext-6.12"}, ("name", "sched_ext-6.12")),
        ({"build_host": "me@big.example:2222"}, ("build_host", ("me@big.example:2222",))),
        ({"build_host": " b1  me@b2:22 b1 "}, ("build_host", ("b1", "me@b2:22"))),  # several: each once, in order
        ({"ccache_max_size": "0"}, ("ccache_max_size", "0")),  # ccache's "no limit"
    ],
    ids=lambda v: str(v),
)
def test_valid_values(tmp_path: Path, flags: dict[str, object], expected: tuple[str, object]) -> None:
    field, value = expected
    assert getattr(make(tmp_path, **flags), field) == value


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("name", "../x"),
        ("name", ".hidden"),
        ("name", "-x"),
        ("name", "a b"),
        ("name", ""),
        ("memory", "4X"),
        ("memory", "0"),
        ("memory", "-1G"),
        ("cpus", "0"),
        ("cpus", "two"),
        ("run_timeout", "-5"),
        ("run_timeout", "1.5"),
        ("boot_timeout", "soon"),
        ("deps_retries", "0"),
        ("verbose", "maybe"),
        ("verbose", "True"),
        ("workspace_rw", "yes"),
        ("arch", "sparc"),
        ("accel", "hvf"),
        ("network", "tap"),
        ("kconfig", "no-such-file"),
        ("kconfig_base", "no-such.config"),
        ("kconfig_base", "Tiny"),
        ("kconfig_base", ""),
        ("kernel", "no-such-kernel"),
        ("llvm", "yes"),
        ("cc", "gcc; rm -rf /"),
        ("packages", "--allow-unauthenticated"),
        ("qemu_opts", "-device 'unterminated"),
        # vng joins QEMU options with spaces into a shell command: a space inside one never reaches QEMU whole.
        ("qemu_opts", "-device 'virtio-rng-pci,id=rng 0'"),
        ("append", "a\nb"),
        ("tag", "--upload-pack=evil"),
        ("version", "v2/../../x"),
        ("build_host", "host; id"),
        ("build_host", "b1 b2:0"),  # each host of the list is checked
        ("ccache_max_size", "5 G"),
        ("ccache_max_size", "-1"),
        ("extra_rwdirs", "/tmp/a=b"),
    ],
)
def test_bad_value_names_its_input(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(InputError) as caught:
        make(tmp_path, **{key: value})
    assert str(caught.value).startswith(key.replace("_", "-") + ": ")


def test_kconfig_base_is_vng_tiny_or_a_config_file(tmp_path: Path) -> None:
    assert make(tmp_path).kconfig_base == "vng"
    assert make(tmp_path, kconfig_base="tiny").kconfig_base == "tiny"
    assert make(tmp_path, kconfig_base="tiny", arch="arm64").kconfig_base == "tiny"
    (tmp_path / "my.config").write_text("CONFIG_64BIT=y\n")
    assert make(tmp_path, kconfig_base="my.config").kconfig_base == tmp_path / "my.config"
    with pytest.raises(InputError, match=r"^kconfig-base: tiny is not available for s390x yet"):
        make(tmp_path, kconfig_base="tiny", arch="s390x")


def test_kconfig_is_relative_to_the_workspace(tmp_path: Path) -> None:
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "kernel.config").write_text("CONFIG_IKCONFIG=y\n")
    assert make(tmp_path, kconfig="ci/kernel.config").kconfig == tmp_path / "ci" / "kernel.config"


def test_unknown_flag_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^no-such: "):
        make(tmp_path, no_such="1")


def test_flags_beat_config(tmp_path: Path) -> None:
    config = {**DEFAULTS, "memory": "1G", "cpus": "1"}
    s = effective(config, {"memory": "2G", "cpus": None}, workspace=tmp_path)
    assert (s.memory_mib, s.cpus) == (2048, 1)


def test_cache_dir_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert make(tmp_path).cache_dir == tmp_path / "xdg" / "vngtasks"


def test_a_relative_kernel_url_is_relative_to_the_workspace(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    assert make(workspace, kernel_url="../linux").kernel_url == str(tmp_path / "linux")
    assert make(workspace, kernel_url="~/linux").kernel_url == str(Path.home() / "linux")
    for url in ("https://git.kernel.org/x/linux.git", "git@github.com:torvalds/linux.git", "file:///srv/linux"):
        assert make(workspace, kernel_url=url).kernel_url == url


def test_debug_options_are_the_tables_each_once_in_its_order(tmp_path: Path) -> None:
    s = effective(DEFAULTS, {"debug": "lkdtm, kasan kmemleak,lkdtm"}, workspace=tmp_path)
    assert s.debug == ("kasan", "kmemleak", "lkdtm")
    assert effective(DEFAULTS, {}, workspace=tmp_path).debug == ()


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        ({"debug": "kasan,msan"}, "'msan' is not one of kasan, ubsan, kcsan, lockdep, kmemleak, lkdtm"),
        ({"debug": "kasan kcsan"}, "kasan and kcsan exclude each other"),
        ({"debug": "kcsan", "arch": "riscv64"}, "kcsan is not offered on riscv64"),
    ],
)
def test_a_debug_option_that_cannot_be_is_refused(tmp_path: Path, flags: dict[str, str], said: str) -> None:
    with pytest.raises(InputError) as raised:
        effective(DEFAULTS, flags, workspace=tmp_path)
    assert raised.value.input == "debug" and said in str(raised.value)


def test_debug_options_are_a_fragment_after_btf_and_before_the_users_and_part_of_the_key(tmp_path: Path) -> None:
    (tmp_path / "k.config").write_text("CONFIG_X=y\n")
    flags = {"debug": "kasan,lkdtm", "kconfig_base": "tiny", "kconfig": "k.config", "name": "ci"}
    s = effective(DEFAULTS, flags, workspace=tmp_path)
    found = dict(kconfig.fragments(s))
    assert list(found) == ["tiny.config", "btf.config", "debug.config", "kconfig.config"]
    assert {"CONFIG_KASAN=y", "# CONFIG_SLUB_TINY is not set", "CONFIG_LKDTM=y", "CONFIG_DEBUG_KERNEL=y"} <= set(
        found["debug.config"].splitlines()
    )
    assert cache.key_for(s, "a" * 12) == f"vng-kernel-ci-{s.arch.name}-{'a' * 12}-v2+tiny+debug-kasan-lkdtm"
    plain = effective(DEFAULTS, {"debug": "ubsan"}, workspace=tmp_path)
    assert cache.key_for(plain, "a" * 12).endswith("-v2+debug-ubsan")
