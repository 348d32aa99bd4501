"""Model-file formats shared by the converter (which writes them) and the runtime (which reads them)."""
