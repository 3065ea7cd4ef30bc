"""pytest-lora's benchmark suites, shipped with the plugin as ``pytest_lora.suites``.

``pytest --lora-bench`` runs them in any project where the plugin is installed.
"""
