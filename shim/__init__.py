"""mmshim: the proxy between legacy agents and the MMA/MMS model managers."""
