"""The bare pyarrow pass the features stage is measured against: every raw CSV
part streamed into one Parquet file, no validation.

    python -m benchmarks.pyarrow_pass RAW_DIR OUT.parquet
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.csv as pcsv
import pyarrow.parquet as pq


def convert(raw_dir: Path, out: Path) -> None:
    writer = None
    try:
        for part in sorted(raw_dir.glob("*.csv")):
            for batch in pcsv.open_csv(part):
                if writer is None:
                    writer = pq.ParquetWriter(out, batch.schema)
                writer.write_batch(batch)
    finally:
        if writer is not None:
            writer.close()


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
