"""avd measured beside its Python peers (imagezmq, vidgear's NetGear) in one run.

``python -m tests.peers`` (``make peers``); see ``compare`` for what is measured and how.
The peers are optional dependencies (``pip install -e '.[peers]'``); nothing in ``avd``
imports them.
"""
