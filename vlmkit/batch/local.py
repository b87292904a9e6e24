"""``vlmkit batch`` in one process: check the input, recover the output, then run the rows not yet
answered through one ``BatchWorker`` and append each result as it finishes, under a progress bar."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..serve.config import ServeConfig
from .files import ResultsFile, output_line, scan_input
from .rows import BatchWorker, read_requests


@dataclass
class BatchReport:
    """What a run did: rows in the input, rows found already written, rows written now, errors among those."""

    total: int
    already_done: int
    written: int = 0
    errors: int = 0

    def describe(self, output) -> str:
        kept = f"; {self.already_done} were already there" if self.already_done else ""
        return f"{self.written} row(s) written to {output} ({self.errors} error(s)){kept}; " \
               f"{self.already_done + self.written}/{self.total} done"


def run_batch(config: ServeConfig, input_path, output_path, *, concurrency: int = 32, progress: bool = True,
              worker: BatchWorker | None = None) -> BatchReport:
    """Answer every row of ``input_path`` not yet in ``output_path``, appending OpenAI batch output
    lines (in the order rows finish). Safe to kill at any moment and run again. ``worker`` reuses an
    already loaded model (tests, notebooks); otherwise ``config.model`` is loaded."""
    summary = scan_input(input_path)  # before loading anything: a bad file fails in a second
    with ResultsFile(output_path) as results:
        done = results.open(summary.custom_ids, input_path)
        report = BatchReport(summary.total, len(done))
        if report.already_done == report.total:
            return report
        own = worker is None
        worker = worker or BatchWorker.load(config, concurrency)
        try:
            with progress_bar(summary.total, report.already_done, progress) as bar:
                for finished in worker.run_grouped(read_requests(input_path, skip=done)):
                    results.append([output_line(request.custom_id, status, body) for request, status, body in finished])
                    report.written += len(finished)
                    report.errors += sum(status != 200 for _, status, _ in finished)
                    bar.update(len(finished))
                    if report.errors:
                        bar.set_postfix(errors=report.errors, refresh=False)
        finally:
            if own:
                worker.close()
    return report


def progress_bar(total: int, done: int, enabled: bool):
    """The batch run's progress bar on stderr: ``total`` rows, ``done`` of them already written."""
    from tqdm import tqdm
    return tqdm(total=total, initial=done, unit="row", desc="batch", dynamic_ncols=True, smoothing=0.05,
                disable=not enabled, file=sys.stderr)
