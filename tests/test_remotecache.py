"""ccache-remote: its URL checked and shown without secrets, and how a build reads it (unit tier: no ccache, no
server; tests/test_remote_storage.py runs real ones)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from invoke import Context

from vngtasks import action, arches, buildsteps, kernelmake, remotecache
from vngtasks.settings import DEFAULTS, effective
from vngtasks.validate import InputError

SECRET = "p4ss%2Fw0rd"


@pytest.mark.parametrize(
    "url",
    [
        "http://cache.example:8080/ccache",
        f"http://ci:{SECRET}@10.0.0.2/ccache/",
        "http://[fd00::2]:80/c|layout=bazel|connect-timeout=50",
        "http://cache.example|bearer-token=abc.def-ghi|read-only",
        "redis://cache.example",
        f"redis://{SECRET}@cache.example:6379/2",
        f"redis://ci:{SECRET}@cache.example|operation-timeout=2000",
    ],
)
def test_urls_ccache_takes_are_taken(url: str) -> None:
    assert remotecache.parse("ccache_remote", url, None) == url  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://cache.example/c", "no TLS"),
        ("rediss://cache.example", "no TLS"),
        ("file:/srv/ccache", "expected http://"),
        ("http://a.example/c http://b.example/c", "one URL"),
        ("http://cache.example/c\nremote_only = true", "one URL"),  # a second line in ccache's config file
        ("http://cache.example/c?x=1", "no ? or #"),
        ("http://cache.example/c#frag", "no ? or #"),
        ("http://cache.example:0/c", "port"),
        ("http://cache.example:99999/c", "port"),
        ("http://cache.example/c|umask=000", "attributes"),
        ("http://cache.example/c|layout=$(id)", "attributes"),
        ("redis://cache.example/db", "database number"),
        ("http://us er@cache.example/c", "one URL"),
        ("http://a;b/c", "host"),
        ("http:///c", "host"),
    ],
)
def test_a_bad_url_is_refused_by_name_without_its_value(url: str, says: str) -> None:
    with pytest.raises(InputError) as refused:
        effective(DEFAULTS, {"ccache_remote": url}, workspace=Path("/w"))
    assert str(refused.value).startswith("ccache-remote: ") and says in str(refused.value)
    assert "example" not in str(refused.value) and "a;b" not in str(refused.value)


def test_a_remote_needs_ccache_and_reshare_needs_a_remote() -> None:
    with pytest.raises(InputError, match=r"^ccache-remote: needs kernel-compile-cache true"):
        effective(DEFAULTS, {"ccache_remote": "redis://c", "kernel_compile_cache": "false"}, workspace=Path("/w"))
    with pytest.raises(InputError, match=r"^ccache-reshare: needs ccache-remote"):
        effective(DEFAULTS, {"ccache_reshare": "true"}, workspace=Path("/w"))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://cache.example:8080/c", "http://cache.example:8080/c"),
        (f"http://ci:{SECRET}@cache.example/c|connect-timeout=50", "http://***@cache.example/c|connect-timeout=50"),
        (f"redis://{SECRET}@cache.example:6379/2", "redis://***@cache.example:6379/2"),
        (
            f"http://cache.example/c|bearer-token={SECRET}|read-only",
            "http://cache.example/c|bearer-token=***|read-only",
        ),
        ("", ""),
    ],
)
def test_shown_hides_users_passwords_and_tokens(url: str, shown: str) -> None:
    assert remotecache.shown(url) == shown


def test_the_secrets_github_is_told_to_mask() -> None:
    assert remotecache.secrets(f"http://ci:{SECRET}@h/c|bearer-token=tok") == [f"ci:{SECRET}", "tok"]
    assert remotecache.secrets(f"redis://{SECRET}@h") == [SECRET]
    assert remotecache.secrets("redis://h") == [] and remotecache.secrets("") == []


X86 = arches.lookup("x86_64")


def plan(**flags: str) -> buildsteps.Plan:
    settings = effective(DEFAULTS, {"tag": "v6.12", **flags}, workspace=Path("/work/project"))
    return buildsteps.Plan(settings, "a" * 40, "/w/linux", X86, 8, "/w/tools")


def test_the_url_reaches_ccache_through_a_file_never_the_environment() -> None:
    url = f"redis://{SECRET}@cache.example"
    env = buildsteps.build_env(plan(ccache_remote=url), "/home/u", {})
    assert env["CCACHE_CONFIGPATH"] == "/w/tools/ccache.conf"
    assert not [value for value in env.values() if SECRET in value]
    assert "CCACHE_CONFIGPATH" not in buildsteps.build_env(plan(), "/home/u", {})


def test_the_build_s_config_keeps_the_machine_s_own_lines_but_its_remote() -> None:
    own = "max_size = 9G\nremote_storage = http://old/c\n  reshare=true\nsloppiness = time_macros\n"
    text = remotecache.config_text("redis://new", True, own)
    assert text.splitlines() == ["max_size = 9G", "sloppiness = time_macros", "remote_storage = redis://new",
                                 "reshare = true"]  # fmt: skip


def test_the_config_file_is_private_while_the_build_runs_and_gone_after(tmp_path: Path) -> None:
    (tmp_path / "ccache").mkdir()
    (tmp_path / "ccache" / "ccache.conf").write_text("compression_level = 3\n")
    (tmp_path / "tools").mkdir()
    settings = effective(DEFAULTS, {"tag": "v6.12", "ccache_remote": f"redis://{SECRET}@h"}, workspace=tmp_path)
    p = buildsteps.Plan(settings, "a" * 40, str(tmp_path / "linux"), X86, 1, str(tmp_path / "tools"))
    env = buildsteps.build_env(p, str(tmp_path), {"CCACHE_DIR": str(tmp_path / "ccache")})
    config = tmp_path / "tools" / "ccache.conf"
    config.write_text("an older file, readable by all")
    config.chmod(0o644)
    with buildsteps.ccache_config(Context(), p, env):
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert config.read_text().splitlines() == ["compression_level = 3", f"remote_storage = redis://{SECRET}@h",
                                                   "reshare = false"]  # fmt: skip
    assert not config.exists()


def test_counts_are_read_from_ccache_s_stats_log_counters() -> None:
    uniq = "   3 # f.c\n   2 direct_cache_hit\n   1 preprocessed_cache_hit\n   1 cache_miss\n   1 local_storage_hit\n"
    uniq += "   2 remote_storage_hit\n   4 remote_storage_read_hit\n   1 remote_storage_error\n x remote_storage_hit\n"
    counts = kernelmake.count_stats(uniq)
    assert counts == {"hits": 3, "misses": 1, "local_hits": 1, "remote_hits": 2, "remote_errors": 1}
    assert kernelmake.count_stats("") == dict.fromkeys(kernelmake.CCACHE_COUNTERS, 0)


def test_a_remote_that_failed_is_one_warning_without_its_secret(capsys, monkeypatch) -> None:
    counts = {"hits": 10, "misses": 5, "local_hits": 10, "remote_hits": 0, "remote_errors": 5}
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    kernelmake.warn_remote_errors(kernelmake.Compiled(1.0, counts), f"http://ci:{SECRET}@h/c")
    kernelmake.warn_remote_errors(kernelmake.Compiled(1.0, {**counts, "remote_errors": 0}), "http://h/c")
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "vngtasks: warning: ccache-remote: http://***@h/c failed 5 times in 15 compilations; the build went on "
        "with the local ccache"
    ]


def test_the_summary_says_local_and_remote_hits_and_misses() -> None:
    counts = {"hits": 1351, "misses": 1, "local_hits": 3, "remote_hits": 1348, "remote_errors": 0}
    assert action.ccache_phrase({"ccache": counts, "ccache_remote": "http://h/c"}) == (
        "ccache: 3 local hits, 1348 remote hits, 1 miss"
    )
    assert action.ccache_phrase({"ccache": counts, "ccache_remote": None}) == "ccache: 3 local hits, 1 miss"
    assert action.ccache_phrase({"ccache": {"local_hits": "9; rm", "misses": True}}) == ""
    assert action.ccache_phrase({"ccache": None}) == "" and action.ccache_phrase({}) == ""
