"""Push a stage's final folder to the Hugging Face Hub with a generated model card, and publish the Gradio Space.

    python -m hfnanochat.push out/sft/final --repo me/hfnanochat-d20                 # model + card
    python -m hfnanochat.push out/sft/final --repo me/hfnanochat-d20 --native        # + native/ for stock transformers
    python -m hfnanochat.push out/sft/final --repo me/hfnanochat-d20 --dry-run /tmp/up   # write it, upload nothing
    python -m hfnanochat.push out/sft/final --repo me/hfnanochat-d20 --space me/hfnanochat-chat   # + the Space
    python -m hfnanochat.push --space me/hfnanochat-chat --repo me/hfnanochat-d20     # the Space only

The token is the usual one: `hf auth login`, or `HF_TOKEN`. Pushing the same run again makes no new commit.
"""

import argparse
import sys
from pathlib import Path

from huggingface_hub.errors import HfHubHTTPError

from .hub import build_space_folder, build_upload_folder, push, push_space


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m hfnanochat.push", description=__doc__.split("\n")[0])
    p.add_argument("folder", nargs="?", default=None, help="a stage's final folder (e.g. out/sft/final)")
    p.add_argument("--repo", default=None, help="model repo id, ORG/NAME (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repos private")
    p.add_argument(
        "--native",
        action="store_true",
        help="also upload native/: the weights as transformers' NanoChatForCausalLM (no remote code; seed "
        "architecture only)",
    )
    p.add_argument(
        "--report",
        default=None,
        help="the run's report folder (report.md, curve PNGs, section JSON files) or report.md "
        "(default: report/ or report.md in the run folder, two levels above FOLDER)",
    )
    p.add_argument("--space", default=None, help="also publish the Gradio Space to this repo id (ORG/NAME)")
    p.add_argument(
        "--dry-run",
        default=None,
        metavar="DIR",
        help="write the folder that would be uploaded to DIR and upload nothing (with --space and FOLDER: "
        "DIR/model and DIR/space)",
    )
    args = p.parse_args(argv)
    if args.folder is None and args.space is None:
        p.error("give a final FOLDER with --repo, or --space REPO")
    if args.folder is not None:
        if args.repo is None:
            p.error("--repo ORG/NAME is required to push a model folder")
        if not Path(args.folder).is_dir():
            p.error(f"{args.folder} is not a folder")
    for flag, value in (("--repo", args.repo), ("--space", args.space)):
        if value is not None and (value.count("/") != 1 or not all(value.split("/"))):
            p.error(f"{flag} must be ORG/NAME, got {value!r}")
    if args.dry_run is not None and Path(args.dry_run).exists() and any(Path(args.dry_run).iterdir()):
        p.error(f"--dry-run {args.dry_run} exists and is not empty: give a new folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.dry_run is not None:
            out = Path(args.dry_run)
            both = args.folder is not None and args.space is not None
            if args.folder is not None:
                model_dir = out / "model" if both else out
                build_upload_folder(args.folder, model_dir, args.repo, report=args.report, native=args.native)
                print(f"wrote {model_dir} (the model repo {args.repo})")
            if args.space is not None:
                space_dir = out / "space" if both else out
                build_space_folder(space_dir, args.repo)
                print(f"wrote {space_dir} (the Space {args.space})")
            return 0
        if args.folder is not None:
            info = push(args.folder, args.repo, private=args.private, report=args.report, native=args.native)
            print(f"pushed {args.folder} -> {info.commit_url}")
        if args.space is not None:
            info = push_space(args.space, args.repo, private=args.private)
            print(f"published the Space -> {info.commit_url}")
        return 0
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except (HfHubHTTPError, OSError) as e:  # no token, no network, no permission: the Hub's own message says which
        sys.stderr.write(f"error: {e}\n")
        return 1


def cli() -> None:
    """The `hfnanochat-push` console script."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
