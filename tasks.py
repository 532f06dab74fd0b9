"""vngtasks' invoke collection: `invoke --list` shows the tasks, `invoke --help TASK` their flags."""

from invoke import Collection

from vngtasks.settings import DEFAULTS
from vngtasks.tasks import boot, deps, show

ns = Collection(boot.boot, deps.deps, show.settings)
ns.configure({"vng": DEFAULTS})
