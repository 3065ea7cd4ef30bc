"""The report: records rendered as tables (terminal, markdown), the headline, plots and CSV, and what a run publishes beside its JSON."""
