"""vngtasks' invoke collection: `invoke --list` shows the tasks, `invoke --help TASK` their flags."""

from invoke import Collection

from vngtasks.settings import DEFAULTS
from vngtasks.tasks import _common, action, bisect, boot, build, cache, deps, matrix, resolve, show

ns = Collection(
    deps.deps,
    resolve.resolve,
    build.build,
    boot.boot,
    bisect.bisect,
    matrix.matrix,
    cache.cache,
    show.settings,
    action.ns,
)
ns.configure({"vng": DEFAULTS})
_common.parse_errors_are_bad_input()
