"""The compile check's reading of ptxas reports and SASS (the compile check itself runs
in CI as a command; these pin down the parts that decide pass or fail)."""

from __future__ import annotations

from mixlora_kernels.tuning.compile_check import _resource_usage, local_accesses_in_loops

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0510*/                   STL [R1], R10 ;
        /*0520*/                   IMAD R2, R3, R4, RZ ;
        /*0530*/                   LDL R5, [R1+0x4] ;
        /*0540*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0550*/              @!P0 BRA 0x0520 ;
        /*0560*/                   LDL.LU R0, [R1] ;
        /*0570*/                   BRA 0x0590 ;
        /*0590*/                   EXIT ;
"""


def test_only_local_accesses_between_a_backward_branch_and_its_target_count():
    # STL at 0x510 is before the loop [0x520, 0x550], LDL.LU at 0x560 after it; the LDL at
    # 0x530 is inside. The forward BRA at 0x570 is no loop.
    assert local_accesses_in_loops(SASS) == 1
    assert local_accesses_in_loops(SASS.replace("LDL R5, [R1+0x4]", "IADD R5, R1, 0x4")) == 0


def test_registers_and_spill_stores_come_from_the_ptxas_report():
    log = (
        "ptxas info    : Function properties for _kernel\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 128 registers, used 1 barriers, 528 bytes cmem[0]\n"
    )
    assert _resource_usage(log, b"") == (128, 4)
