"""``realign app``: a page to see the coarse image, edit its regions and realign (gradio, the ``[app]`` extra).

``session`` is the layout and its edits (no model, no gradio), ``engine`` the shared pipeline, ``ui`` the page,
``command`` the command line (``add_app_parser``).
"""
