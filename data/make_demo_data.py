"""Rebuilds data/tydi-mini (the embedded demo data) from a full tydi-mini copy, deterministically.

    python data/make_demo_data.py ../shared/data/tydi-mini data/tydi-mini

Corpus, dev, qrels and the overlap flags are copied as they are. To keep the repository small, training
rows keep their first 2 BM25 negatives (of up to 8) and pretrain-en keeps its first 1,000 queries.
"""
import glob
import gzip
import json
import os
import shutil
import sys

NEGATIVES = 2
PRETRAIN_QUERIES = 1000


def write_rows(path, rows):
  # mtime=0 and no file name in the header: a rebuild is byte-identical.
  with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as file:
    for row in rows:
      file.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def trimmed(paths, limit=None):
  count = 0
  for path in sorted(paths):
    with gzip.open(path, "rt", encoding="utf-8") as file:
      for line in file:
        if limit is not None and count >= limit:
          return
        row = json.loads(line)
        row["negative_passages"] = row["negative_passages"][:NEGATIVES]
        count += 1
        yield row


def main(source, target):
  os.makedirs(target, exist_ok=True)
  for folder in ("corpus", "dev", "qrels"):
    shutil.copytree(os.path.join(source, folder), os.path.join(target, folder), dirs_exist_ok=True)
  for name in ("README.md", "mrtydi_overlap.tsv"):
    shutil.copy(os.path.join(source, name), os.path.join(target, name))
  os.makedirs(os.path.join(target, "train"), exist_ok=True)
  for path in sorted(glob.glob(os.path.join(source, "train", "*.jsonl.gz"))):
    write_rows(os.path.join(target, "train", os.path.basename(path)), trimmed([path]))
  os.makedirs(os.path.join(target, "pretrain-en"), exist_ok=True)
  write_rows(os.path.join(target, "pretrain-en", "train.jsonl.gz"),
             trimmed(glob.glob(os.path.join(source, "pretrain-en", "train*.jsonl.gz")), PRETRAIN_QUERIES))
  for path in glob.glob(os.path.join(target, "**", "*"), recursive=True):
    if os.path.isfile(path):
      os.chmod(path, 0o644)


if __name__ == "__main__":
  main(*sys.argv[1:3])
