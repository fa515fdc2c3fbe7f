"""What PAL does not need but this environment does: format conversion, downloads, CPU-only speed paths and
fine-tuning helpers. Everything here imports the core files; no core file imports anything from here."""
