fn main() -> std::process::ExitCode {
    gateway_user::cli::main()
}
