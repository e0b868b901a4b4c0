"""The one progress-callback shape of the core: the CLI draws it with tqdm, the app with st.progress."""

from collections.abc import Callable

Progress = Callable[[int, int, str], None]  # (done, total, what is being worked on)
