#!/usr/bin/env python3
"""The operator commands of README.md and docs/QGA.md, as e2e/qga.sh runs them.

A command block is marked by an HTML comment on the line before its fence:

    <!-- e2e: NAME -->
    ```sh
    ...
    ```

Usage:
  doc_commands.py check
      every block in BLOCKS is marked exactly once; exit 1 (naming them) otherwise
  doc_commands.py lines NAME [--program P] [--sub FROM=TO]...
      the block's commands, one a line (backslash continuations joined), after the
      substitutions (in the order given; FROM is a path or a program name, replaced only
      as a whole word); with --program, only the commands that start with P (as written)
  doc_commands.py qemu-options NAME [--sub FROM=TO]...
      the device options of the block's qemu-system-x86_64 command (-machine, -device,
      -chardev, -object; not -m and the like, the operator's own), one a line
      (`-device VALUE`), and `append WORD` for each word of -append (not `...`)
"""
import os
import re
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> the document that holds it
BLOCKS = {
    "serve": "README.md",
    "qemu-doorbell": "README.md",
    "qemu-plain": "README.md",
    "guest-probe": "README.md",
    "qga-host-bridge": "docs/QGA.md",
    "qga-guest": "docs/QGA.md",
    "qga-client": "docs/QGA.md",
}
DEVICE_OPTIONS = ("-machine", "-device", "-chardev", "-object")
MARK = re.compile(r"^<!-- e2e: ([\w-]+) -->\s*$")


def blocks(doc):
    """NAME -> [text, ...] for every marked block of doc."""
    found = {}
    lines = open(os.path.join(ROOT, doc), encoding="utf-8").read().split("\n")
    for i, line in enumerate(lines):
        m = MARK.match(line)
        if not m:
            continue
        if i + 1 >= len(lines) or not lines[i + 1].startswith("```"):
            found.setdefault(m.group(1), []).append(None)
            continue
        body = []
        for inner in lines[i + 2:]:
            if inner.startswith("```"):
                break
            body.append(inner)
        found.setdefault(m.group(1), []).append("\n".join(body))
    return found


def block(name):
    texts = blocks(BLOCKS[name]).get(name, [])
    if len(texts) != 1 or texts[0] is None:
        sys.exit(f"{BLOCKS[name]}: block {name}: marked {len(texts)} times, or not before a fence")
    return texts[0]


def substitute(text, subs):
    for frm, to in subs:
        text = re.sub(r"(?<![\w./-])" + re.escape(frm) + r"(?![\w-])", lambda _m: to, text)
    return text


def commands(text):
    return [c.strip() for c in text.replace("\\\n", " ").split("\n") if c.strip()]


def main(argv):
    if not argv:
        sys.exit(__doc__)
    if argv[0] == "check":
        bad = []
        for name, doc in BLOCKS.items():
            texts = blocks(doc).get(name, [])
            if len(texts) != 1 or texts[0] is None:
                bad.append(f"{doc}: {name} ({len(texts)} marked)")
        if bad:
            print("missing or duplicated blocks: " + "; ".join(bad))
            return 1
        return 0
    mode, name, rest = argv[0], argv[1], argv[2:]
    subs, program = [], None
    while rest:
        if rest[0] == "--sub":
            frm, to = rest[1].split("=", 1)
            subs.append((frm, to))
        elif rest[0] == "--program":
            program = rest[1]
        else:
            sys.exit(f"unknown argument {rest[0]}")
        rest = rest[2:]
    if mode == "lines":
        for c in commands(block(name)):
            if program is None or c.split()[0] == program:
                print(substitute(c, subs))
        return 0
    if mode == "qemu-options":
        for c in commands(substitute(block(name), subs)):
            words = shlex.split(c, comments=True)
            if not words or words[0] != "qemu-system-x86_64":
                continue
            i = 1
            while i < len(words):
                if words[i] == "-append" and i + 1 < len(words):
                    for w in words[i + 1].split():
                        if w != "...":
                            print("append " + w)
                    i += 2
                elif words[i] in DEVICE_OPTIONS and i + 1 < len(words):
                    print(words[i] + " " + words[i + 1])
                    i += 2
                else:
                    i += 1
        return 0
    sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
