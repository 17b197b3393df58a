"""cxrcam: weakly supervised localisation of thoracic findings on chest radiographs."""
__version__ = "0.1.0"
