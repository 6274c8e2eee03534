"""Download ChatGLM2-6B's tokenizer.model from the Hugging Face Hub.

    python -m chatglm_tokenizer.download [--dest chatglm_tokenizer] [--repo THUDM/chatglm2-6b] [--revision main]

Where huggingface.co is unreachable, set HF_ENDPOINT (e.g. https://hf-mirror.com) first.
"""

import argparse
import shutil
from pathlib import Path

from atomic import atomic_write

from . import DEFAULT_DIR, load_tokenizer


def download(dest=DEFAULT_DIR, repo="THUDM/chatglm2-6b", revision="main"):
    from huggingface_hub import hf_hub_download

    cached = hf_hub_download(repo_id=repo, filename="tokenizer.model", revision=revision)
    target = Path(dest) / "tokenizer.model"
    atomic_write(target, lambda tmp: shutil.copyfile(cached, tmp))
    return target


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default=str(DEFAULT_DIR))
    parser.add_argument("--repo", default="THUDM/chatglm2-6b")
    parser.add_argument("--revision", default="main")
    args = parser.parse_args()
    target = download(args.dest, args.repo, args.revision)
    tok = load_tokenizer(args.dest)
    print(f"saved {target}: {tok.n_pieces} pieces, vocab_size {tok.vocab_size}, sha256 {tok.fingerprint[:16]}")


if __name__ == "__main__":
    main()
