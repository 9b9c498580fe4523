//! The controller: turns last-gasp reports and netconsole streams into termination reasons
//! on pods and nodes.

pub mod netconsole;
