#!/bin/bash
# Rendered by vngtasks (templates/guest.sh.j2); runs as the VM's init command.
# The host watches /cache/vngtasks/runs/golden, shared with this guest: "started" ends the boot (it holds the
# guest's uptime, for the run's timings), "status" ends the run; "release" and "dmesg" are for
# the run's record. Builtins where they do (every program started costs time under emulation);
# each small file is one write, which the host reads again until it holds a whole line.
run_dir=/cache/vngtasks/runs/golden
while IFS= read -r -d '' assignment; do
    export "$assignment" 2>/dev/null || true
done < "$run_dir/environ"
cd '/work/my project' || exit 125
read -r release < /proc/sys/kernel/osrelease
printf '%s\n' "$release" > "$run_dir/release"
read -r uptime _ < /proc/uptime
printf '%s\n' "$uptime" > "$run_dir/started"
# As GitHub runs a `run:` step (and the seed ran `run`): the first failing command ends it.
bash -eo pipefail "$run_dir/workload.sh"
status=$?
# Each record with its facility, which tells the kernel's lines from what programs wrote: util-linux's -x names
# it (its -r loses it), busybox's -r keeps it in the priority.
{ dmesg -x 2>/dev/null || dmesg -r; } > "$run_dir/dmesg" 2>&1 || true
# Everything the workload wrote reaches the host before the status says the run is over.
sync
printf '%s\n' "$status" > "$run_dir/status"
exit "$status"
