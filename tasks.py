"""vngtasks' invoke collection: `invoke --list` shows the tasks, `invoke --help TASK` their flags."""

from invoke import Collection

from vngtasks.settings import DEFAULTS
from vngtasks.tasks import boot, cache, deps, resolve, show

ns = Collection(boot.boot, deps.deps, show.settings, resolve.resolve, cache.cache)
ns.configure({"vng": DEFAULTS})
