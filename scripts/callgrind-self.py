#!/usr/bin/env python3
"""Self cost (Ir) per function of one callgrind dump, divided by an op count.

    callgrind-self.py DIR THREAD DUMP OPS [TOP]

DIR holds the dumps of one run (`--callgrind-out-file=DIR/cg.%p`, `--separate-threads=yes`);
THREAD is the thread suffix of the files (e.g. 05), DUMP the name given to
`callgrind_control -d`. Why not callgrind_annotate: with name compression a later dump refers
to function names defined only in an earlier dump of the same thread, which callgrind_annotate
(reading one file) cannot resolve; this reads the thread's dumps in order and keeps the names.
Prints the TOP functions (default 15) and the Ir per op spent in memcpy/memmove.
"""
import collections
import glob
import re
import sys

directory, thread, dump, ops = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
top = int(sys.argv[5]) if len(sys.argv) > 5 else 15
files = sorted(glob.glob(f"{directory}/cg.*.*-{thread}"),
               key=lambda f: int(f.rsplit(".", 1)[1].split("-")[0]))
names = {}


def resolve(token):
    m = re.match(r"\((\d+)\)(?: (.*))?", token)
    if not m:
        return token
    if m.group(2) is not None:
        names[m.group(1)] = m.group(2)
    return names.get(m.group(1), token)


for path in files:
    lines = open(path).read().splitlines()
    wanted = f"desc: Trigger: dump {dump}" in lines
    cost = collections.Counter()
    function = None
    after_call = False
    for line in lines:
        key, _, value = line.partition("=")
        if key == "fn":
            function = resolve(value)
        elif key in ("fl", "fi", "fe", "ob", "cfn", "cfi", "cfl", "cob"):
            resolve(value)
        elif key == "calls":
            after_call = True  # the next cost line is the call's inclusive cost
        elif line[:1].isdigit() or line[:1] in "+-*":
            if after_call:
                after_call = False
                continue
            fields = line.split()
            if len(fields) >= 2 and function is not None:
                cost[function] += int(fields[1])
    if not wanted:
        continue
    total = sum(cost.values())
    print(f"{dump}: {total / ops:.0f} Ir/op self cost in {path}")
    for function, ir in cost.most_common(top):
        print(f"  {ir / ops:8.0f} Ir/op  {function[:100]}")
    copies = sum(ir for function, ir in cost.items() if re.search(r"memcpy|memmove", function))
    print(f"  memcpy/memmove: {copies / ops:.0f} Ir/op")
