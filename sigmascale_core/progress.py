"""The one progress-callback shape of the core: the CLI draws it with tqdm, the app with st.progress."""

import sys
from collections.abc import Callable

Progress = Callable[[int, int, str], None]  # (done, total, what is being worked on)


def tqdm_progress(desc: str) -> Progress:
    """A tqdm-backed (done, total, what) callback, drawn on stderr."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(done: int, total: int, what: str) -> None:
        label = what if what in ("calibration", "perplexity") else desc
        bar = bars.get(label)
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = bars[label] = tqdm(total=total, desc=label, leave=False, file=sys.stderr)
        bar.n = done
        bar.set_postfix_str(what if label == desc else "", refresh=False)
        bar.refresh()
        if done == total:
            bar.close()
            del bars[label]

    return update
