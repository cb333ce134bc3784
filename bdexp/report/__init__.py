"""bdexp-report: collect results.json files into tables and plots."""
