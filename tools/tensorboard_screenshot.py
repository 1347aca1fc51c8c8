"""Train demo model 1 with histograms and screenshot TensorBoard's histogram dashboard.

Usage: python tools/tensorboard_screenshot.py --data DIR --out docs/img/tensorboard_histograms.png

Needs Debian's `chromium` package. TensorBoard and Chromium run on
127.0.0.1 only and are stopped before the script exits.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(data_dir: str, log_dir: str, epochs: int) -> None:
    import keras

    from demos import data, models
    from keras_gradwatch import GradWatch

    prepared = data.prepare(data_dir, seed=0)
    keras.utils.set_random_seed(0)
    model = models.build_model_1()
    x_train, _ = prepared.features(scaled=False)
    watch = GradWatch(log_dir=log_dir, histogram_freq=1, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x_train, prepared.y_train, batch_size=32, epochs=epochs, callbacks=[watch],
                  verbose=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("GRADWATCH_DATA"),
                        help="credit-card data directory (default: $GRADWATCH_DATA)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    parser.add_argument("--filter", default="gradients/.*(dense_[1234]|output)/kernel",
                        help="TensorBoard tag filter (regular expression)")
    args = parser.parse_args()

    log_dir = tempfile.mkdtemp(prefix="gradwatch-tb-")
    train(args.data, log_dir, args.epochs)

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", log_dir, "--host", "127.0.0.1",
         "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    profile = tempfile.mkdtemp(prefix="gradwatch-chromium-")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/histograms/tags",
                                            timeout=5) as response:
                    if b"gradwatch" in response.read():
                        break
            except OSError:
                time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/#histograms&tagFilter={args.filter}"
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
             "--window-size=1400,1000", "--virtual-time-budget=20000",
             f"--screenshot={os.path.abspath(args.out)}", url],
            check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
