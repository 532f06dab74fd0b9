#!/bin/bash
# Rendered by vngtasks (templates/guest.sh.j2); runs as the VM's init command.
# The host watches /cache/vngtasks/runs/golden, shared with this guest: "started" ends the boot (it holds the
# guest's uptime, for the run's timings), "status" ends the run; "release" and "dmesg" are for
# the run's record.
run_dir=/cache/vngtasks/runs/golden
while IFS= read -r -d '' assignment; do
    export "$assignment" 2>/dev/null || true
done < "$run_dir/environ"
cd '/work/my project' || exit 125
uname -r > "$run_dir/release"
read -r uptime _ < /proc/uptime
echo "$uptime" > "$run_dir/started.partial" && mv "$run_dir/started.partial" "$run_dir/started"
# As GitHub runs a `run:` step (and the seed ran `run`): the first failing command ends it.
bash -eo pipefail "$run_dir/workload.sh"
status=$?
dmesg > "$run_dir/dmesg" 2>&1 || true
# Everything the workload wrote reaches the host before the status says the run is over.
sync
echo "$status" > "$run_dir/status.partial" && mv "$run_dir/status.partial" "$run_dir/status"
exit "$status"
