"""What each instruction-set clone of the C++ kernels' hot functions compiles to: instructions,
shuffles, moves and scalar moves, read from the built extension with objdump (no run, no
counters needed). A clone whose vector shuffles were lowered to element moves shows few
shuffles and many scalar moves.

    python benchmarks/clone_instructions.py [path/to/_C.so]
"""

from __future__ import annotations

import collections
import glob
import os
import re
import subprocess
import sys

HOT = ("sweep_chunk", "pack_weight_block", "pack_input_block", "gradient_block_from_kept", "gradient_block",
       "predict_from_rows")
_CLONE = re.compile(rf"({'|'.join(HOT)})<(float|double)>.*\[clone \.(arch_x86_64_v4|arch_x86_64_v3|default)\]")
_SHUFFLE = re.compile(r"perm|shuf|blend|insert|extract|unpck|movlh|movhl|align")


def functions(library: str):
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", library], capture_output=True, text=True,
                             check=True).stdout
    found, name = collections.defaultdict(list), None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
        elif name and "\t" in line:
            words = line.split("\t", 1)[1].split()
            found[name].append(words[0] if words else "")
    return found


def main() -> int:
    default = glob.glob(os.path.join(os.path.dirname(__file__), "..", "fastcaps", "_C*.so"))
    library = sys.argv[1] if len(sys.argv) > 1 else (default[0] if default else None)
    if library is None:
        sys.exit("no built extension found; pass the path of fastcaps/_C*.so")
    rows = []
    for name, ops in functions(library).items():
        match = _CLONE.search(name)
        if match and len(ops) > 8:  # the clones themselves, not their ifunc stubs
            counts = collections.Counter(ops)
            rows.append((*match.groups(), len(ops), sum(n for op, n in counts.items() if _SHUFFLE.search(op)),
                         sum(n for op, n in counts.items() if op.startswith(("vmov", "mov"))),
                         sum(n for op, n in counts.items() if re.match(r"v?movs[sd]$", op))))
    print(f"{'function':<26}{'type':<8}{'clone':<17}{'insns':>7}{'shuffles':>10}{'moves':>7}{'scalar moves':>14}")
    for row in sorted(rows):
        print(f"{row[0]:<26}{row[1]:<8}{row[2]:<17}{row[3]:>7}{row[4]:>10}{row[5]:>7}{row[6]:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
