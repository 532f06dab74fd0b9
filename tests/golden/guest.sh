#!/bin/bash
# Rendered by vngtasks (templates/guest.sh.j2); runs as the VM's init command.
# The host watches /cache/vngtasks/runs/golden, shared with this guest: "started" ends the boot (it holds the
# guest's uptime, for the run's timings), "status" ends the run; "release" and "dmesg" are for
# the run's record. Builtins where they do (every program started costs time under emulation);
# each small file is one write, which the host reads again until it holds a whole line. The
# workload runs in a subshell of this bash, which sees these variables: all named _vngtasks_*.
_vngtasks_dir=/cache/vngtasks/runs/golden
while IFS= read -r -d '' _vngtasks_assignment; do
    export "$_vngtasks_assignment" 2>/dev/null || true
done < "$_vngtasks_dir/environ"
unset _vngtasks_assignment
cd '/work/my project' || exit 125
read -r _vngtasks_line < /proc/sys/kernel/osrelease
printf '%s\n' "$_vngtasks_line" > "$_vngtasks_dir/release"
read -r _vngtasks_line _ < /proc/uptime
printf '%s\n' "$_vngtasks_line" > "$_vngtasks_dir/started"
unset _vngtasks_line
# As GitHub runs a `run:` step (and the seed ran `run`): the first failing command ends it. A subshell, not a
# second bash to start under emulation; $0 stays this script's.
(set -eo pipefail; . "$_vngtasks_dir/workload.sh")
_vngtasks_status=$?
# A kernel with kmemleak on: its leaks, printed by the kernel (verbose), become crash reports. kmemleak reports an
# object at least 5 s old that two scans in a row found unreferenced and unchanged: a wait, then two scans.
if [ -w /sys/kernel/debug/kmemleak ]; then
    { echo 1 > /sys/module/kmemleak/parameters/verbose && sleep 5 && echo scan > /sys/kernel/debug/kmemleak &&
        echo scan > /sys/kernel/debug/kmemleak; } 2>/dev/null
fi
# Each record with its facility, which tells the kernel's lines from what programs wrote: util-linux's -x names
# it (its -r loses it), busybox's -r keeps it in the priority.
{ dmesg -x 2>/dev/null || dmesg -r; } > "$_vngtasks_dir/dmesg" 2>&1 || true
# Everything the workload wrote reaches the host before the status says the run is over.
sync
printf '%s\n' "$_vngtasks_status" > "$_vngtasks_dir/status"
exit "$_vngtasks_status"
