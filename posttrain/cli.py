"""The `posttrain` command line."""

import argparse

from posttrain import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain", description="TRL-compatible post-training (SFT, DPO, GRPO) with fused kernels."
    )
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
