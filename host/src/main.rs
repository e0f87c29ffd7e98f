fn main() -> std::process::ExitCode {
    paxwasm::cli::main()
}
