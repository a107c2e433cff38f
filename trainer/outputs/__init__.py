"""What a run leaves behind: its folder, the export bundle, plots and the report."""
