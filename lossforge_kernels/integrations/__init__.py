"""Drop-in loss modules with the constructor arguments and forward conventions of other libraries."""
