// module MoEVerify
