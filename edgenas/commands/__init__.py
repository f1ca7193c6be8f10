"""The commands: each parser builds one typed request and calls the library function that
takes it; tables and progress bars are drawn here, never in the library."""
