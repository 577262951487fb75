"""Prints the installed iouzcrx's requirements for its test extra, one a line,
leaving out the names given with --without."""

import argparse
import re
from importlib.metadata import requires

parser = argparse.ArgumentParser()
parser.add_argument("--without", action="append", default=[])
args = parser.parse_args()
for requirement in requires("iouzcrx") or []:
    spec, _, marker = requirement.partition(";")
    if not re.search(r"""extra\s*==\s*["']test["']""", marker):
        continue
    name = re.split(r"[\s<>=!~\[(]", spec.strip(), maxsplit=1)[0]
    if name.lower() not in {w.lower() for w in args.without}:
        print(spec.strip())
