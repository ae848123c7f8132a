#!/usr/bin/env bash
# Make room in a device call's carry. Why: a call sends the tracked tree plus its carry within 64 MiB; the
# Gutenberg carry takes ~45 MiB and the committed results keep growing (18.5 MiB tracked in the twenty-fourth
# session, over the limit). `on` untracks the largest result folders in the index only (the files stay on
# disk, ignored through .git/info/exclude), so the device copy leaves them out; `off` puts them back.
# No result folder is needed on the device except phase1-sweep (--from_sweep reads it), which is never slimmed.
# While on, a pre-commit hook refuses every commit: a commit then would delete those folders from main.
# Usage: bash scripts/device_slim.sh on [MiB to free, default 6] | off | status
set -eu
cd "$(git rev-parse --show-toplevel)"
git_dir=$(git rev-parse --git-dir); list="$git_dir/ionllama-slim"; excl="$git_dir/info/exclude"
begin="# ionllama device_slim begin"; end="# ionllama device_slim end"
tracked_mib() { git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {printf "%.1f", s / 1048576}'; }
case "${1:-status}" in
  on)
    [ -e "$list" ] && { echo "already on ($(wc -l < "$list") folders); run: bash $0 off" >&2; exit 2; }
    # `off` resets those folders' index entries to HEAD, which would unstage work staged there: refuse instead
    git diff --cached --quiet || { echo "staged changes: commit or unstage them first (git status)" >&2; exit 2; }
    need=$(( ${2:-6} * 1048576 ))
    # the largest tracked result folders first, by their tracked bytes
    git ls-files -z docs/results | xargs -0 stat -c '%s %n' | awk '{split($2, p, "/"); d = p[1] "/" p[2] "/" p[3];
      if (p[4] != "" && p[3] != "phase1-sweep") s[d] += $1} END {for (d in s) print s[d], d}' | sort -rn |
      awk -v need="$need" 'got < need {print $2; got += $1}' > "$list"
    mkdir -p "$git_dir/info"; { echo "$begin"; sed 's|^\(.*\)$|/\1/|' "$list"; echo "$end"; } >> "$excl"
    xargs -r git rm -r -q --cached -- < "$list"
    hook="$git_dir/hooks/pre-commit"; mkdir -p "$git_dir/hooks"
    grep -q ionllama-slim "$hook" 2>/dev/null || {
      [ -e "$hook" ] || echo '#!/bin/sh' > "$hook"
      # an if, not `[ -e ] && ...`: the hook's status is its last command's, which must be 0 when off
      msg="device_slim is on: run bash scripts/device_slim.sh off first"
      echo "if [ -e \"$list\" ]; then echo '$msg' >&2; exit 1; fi" >> "$hook"
      chmod +x "$hook"; }
    echo "untracked in the index: $(wc -l < "$list") result folders; tracked now $(tracked_mib) MiB" ;;
  off)
    [ -e "$list" ] || { echo "not on"; exit 0; }
    xargs -r git reset -q -- < "$list"
    sed -i "/^$begin\$/,/^$end\$/d" "$excl"; rm -f "$list"
    echo "restored; tracked $(tracked_mib) MiB; git status: $(git status --short | wc -l) changed paths" ;;
  status) [ -e "$list" ] && echo "on: $(tr '\n' ' ' < "$list")" || echo "off"; echo "tracked $(tracked_mib) MiB" ;;
  *) echo "usage: bash $0 on [MiB] | off | status" >&2; exit 2 ;;
esac
