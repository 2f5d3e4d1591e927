"""The desired state: frozen pydantic models of the manifest kinds, the strict YAML loader and units.

Pure data and parsing; imports nothing else from the project. Everyone else reads these models.
"""
