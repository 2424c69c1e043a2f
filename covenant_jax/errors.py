"""The one base class for bad input: the CLI prints these as one clear line and exits 2."""


class UserError(ValueError):
    """Bad input (a file, a field, an option) named in the message; not a bug in covenant_jax."""


USER_ERRORS = (UserError, FileNotFoundError)
