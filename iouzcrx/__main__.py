"""Command line: ``python -m iouzcrx demo|doctor|features|serve``."""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "help"
    if command == "demo":
        from iouzcrx.demo import main as demo

        return demo(argv[1:])
    if command == "doctor":
        from iouzcrx.doctor import main as doctor

        return doctor(argv[1:])
    if command == "serve":
        from iouzcrx.workers import main as serve

        return serve(argv[1:])
    if command == "features":
        from iouzcrx._probe import kernel_features

        print(json.dumps(kernel_features().as_dict(), indent=2))
        return 0
    print("usage: python -m iouzcrx {demo,doctor,features,serve} [options]", file=sys.stderr)
    return 0 if command in ("help", "-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
