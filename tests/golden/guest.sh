#!/bin/bash
# Rendered by vngtasks (templates/guest.sh.j2); runs as the VM's init command.
# The host watches /cache/vngtasks/runs/golden: "started" ends the boot, "status" ends the run.
run_dir=/cache/vngtasks/runs/golden
while IFS= read -r -d '' assignment; do
    export "$assignment" 2>/dev/null || true
done < "$run_dir/environ"
cd '/work/my project' || exit 125
: > "$run_dir/started"
bash "$run_dir/workload.sh"
status=$?
echo "$status" > "$run_dir/status.partial" && mv "$run_dir/status.partial" "$run_dir/status"
exit "$status"
